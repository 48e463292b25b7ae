// Writes sealed audit lines to stdout, one JSON object per line, for node log collectors that read
// container output. The agent's own logs go to stderr, so stdout carries audit records only.
// stdout keeps no position, so open() returns undefined and a resent batch is written again: the
// collector drops duplicates by `id`.

import type { Logger } from "../../log";
import type { AuditSink, SpooledRecord } from "../sink";

export class StdoutSink implements AuditSink {
  readonly name = "stdout";
  private failureStreak = 0;
  /**
   * Keeps an 'error' event (EPIPE once the reader is gone) from crashing the process. send()
   * rejects with the same error through its write callback or its own listener.
   */
  private readonly onStreamError = (error: Error): void => {
    this.logger.debug({ sink: this.name, err: error }, "stdout stream error");
  };

  constructor(
    private readonly logger: Logger,
    private readonly stream: NodeJS.WritableStream = process.stdout,
  ) {
    stream.on("error", this.onStreamError);
  }

  async open(): Promise<number | undefined> {
    return undefined;
  }

  /** Writes the batch and resolves once the stream has processed it, waiting for 'drain' when its buffer is full. */
  async send(batch: readonly SpooledRecord[]): Promise<void> {
    if (batch.length === 0) return;
    const text = batch.map((record) => `${record.line}\n`).join("");
    try {
      await this.write(text);
    } catch (error) {
      this.failed(error, batch.length);
      throw new Error(`writing ${batch.length} audit records to stdout failed: ${(error as Error).message}`, { cause: error });
    }
    this.recovered();
  }

  async close(): Promise<void> {
    this.stream.removeListener("error", this.onStreamError);
  }

  /**
   * Writes `text` and settles once the write callback has run and, when write() returned false,
   * 'drain' has fired. An 'error' or 'close' event before that rejects.
   */
  private write(text: string): Promise<void> {
    const stream = this.stream as NodeJS.WritableStream & { destroyed?: boolean; writableEnded?: boolean };
    if (stream.destroyed === true || stream.writableEnded === true) {
      return Promise.reject(new Error("the stream is closed"));
    }

    return new Promise<void>((resolve, reject) => {
      let written = false;
      let drained = true;
      const cleanUp = (): void => {
        stream.removeListener("error", onError);
        stream.removeListener("close", onClose);
        stream.removeListener("drain", onDrain);
      };
      const settleIfDone = (): void => {
        if (!written || !drained) return;
        cleanUp();
        resolve();
      };
      const onError = (error: Error): void => {
        cleanUp();
        reject(error);
      };
      const onClose = (): void => onError(new Error("the stream closed before the records were written"));
      const onDrain = (): void => {
        drained = true;
        settleIfDone();
      };

      stream.on("error", onError);
      stream.on("close", onClose);
      const accepted = stream.write(text, (error?: Error | null) => {
        if (error) {
          onError(error);
          return;
        }
        written = true;
        settleIfDone();
      });
      if (!accepted) {
        drained = false;
        stream.on("drain", onDrain);
      }
    });
  }

  private failed(error: unknown, records: number): void {
    this.failureStreak += 1;
    if (this.failureStreak === 1) this.logger.error({ sink: this.name, records, err: error }, "writing audit records to stdout failed; the pipeline retries");
  }

  private recovered(): void {
    if (this.failureStreak === 0) return;
    this.logger.info({ sink: this.name, failed_attempts: this.failureStreak }, "writing audit records to stdout works again");
    this.failureStreak = 0;
  }
}
