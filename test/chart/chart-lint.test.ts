// `helm lint --strict` on charts/ambient-agent, with the default values and with each value set of
// chart-cases.ts. Strict mode fails on warnings too, such as a template that renders an unset value.

import test from "ava";
import { lintChart } from "../harness/helm";
import { CHART_CASES } from "./chart-cases";

for (const chartCase of CHART_CASES) {
  test(`lint clean: ${chartCase.name}`, async (t) => {
    const result = await lintChart(chartCase.values, chartCase.options);
    const output = `${result.stdout}${result.stderr}`;
    t.is(result.code, 0, output);
    t.regex(result.stdout, /1 chart\(s\) linted, 0 chart\(s\) failed/);
    t.notRegex(output, /\[(WARNING|ERROR)\]/, output);
  });
}
