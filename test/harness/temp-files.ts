// A temporary folder for a unit test file, with a writer for the config files its tests read.

import type { TestFn } from "ava";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

/** Temporary folder that exists from the test file's before hook until its after hook. */
export interface TempFolder {
  /** Absolute path of the folder. It is empty until the before hook has run. */
  readonly path: string;
  /** Writes `text` to a new file `config-N.yaml` in the folder and returns its path. */
  configFile(text: string): string;
}

/** Registers hooks on `test` that create a folder named `prefix` plus random characters in the OS temp folder and remove it after all tests. */
export function useTempFolder(test: TestFn, prefix: string): TempFolder {
  let folder = "";
  let fileCount = 0;

  test.before(() => {
    folder = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  });

  test.after.always(() => {
    if (folder !== "") fs.rmSync(folder, { recursive: true, force: true });
  });

  return {
    get path() {
      return folder;
    },
    configFile(text: string): string {
      if (folder === "") throw new Error("the temp folder is not created yet: call configFile inside a test");
      const file = path.join(folder, `config-${++fileCount}.yaml`);
      fs.writeFileSync(file, text);
      return file;
    },
  };
}
