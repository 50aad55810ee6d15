// Unit tests of the front-end logic (node --test tests/js): preset filling, the live view's events and the chart.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  chartPoints, fillPreset, formatDuration, onProgress, onStatus, presetTable, statusLine, timeLeft,
} from "../../web/identity_tokens_core.js";

const PRESETS = {
  "Cross-Init": { steps: 320, learning_rate: 0.005, batch_size: 8, reg_weight: 1e-5 },
  "Textual Inversion": { steps: 5000, learning_rate: 1e-4, batch_size: 16, reg_weight: 0 },
};

function trainNode(values) {
  // A stand-in for a LiteGraph node: just its widgets.
  return { widgets: Object.entries(values).map(([name, value]) => ({ name, value })) };
}

const widgetValues = (node) => Object.fromEntries(node.widgets.map((w) => [w.name, w.value]));

test("the preset table comes from the preset input's options", () => {
  const nodeData = { input: { required: { preset: [["Cross-Init"], { default: "Cross-Init", presets: PRESETS }] } } };
  assert.deepEqual(presetTable(nodeData), PRESETS);
  assert.deepEqual(presetTable({ input: { required: {} } }), {});
});

test("choosing a preset fills its real values and leaves other widgets alone", () => {
  const node = trainNode({ preset: "Textual Inversion", steps: 0, learning_rate: 0, batch_size: 0, reg_weight: -1, seed: 7 });
  const changed = fillPreset(node, PRESETS, "Textual Inversion");
  assert.deepEqual(changed, ["steps", "learning_rate", "batch_size", "reg_weight"]);
  assert.deepEqual(widgetValues(node), {
    preset: "Textual Inversion", steps: 5000, learning_rate: 1e-4, batch_size: 16, reg_weight: 0, seed: 7,
  });
  assert.deepEqual(fillPreset(node, PRESETS, "Textual Inversion"), []); // nothing left to change
  assert.deepEqual(fillPreset(node, PRESETS, "no such preset"), []);
});

test("loading an old workflow fills only the widgets that still say 'the preset's'", () => {
  const node = trainNode({ steps: 100, learning_rate: 0, batch_size: 0, reg_weight: -1 });
  fillPreset(node, PRESETS, "Cross-Init", true);
  assert.deepEqual(widgetValues(node), { steps: 100, learning_rate: 0.005, batch_size: 8, reg_weight: 1e-5 });
  const edited = trainNode({ steps: 50, learning_rate: 0.01, batch_size: 2, reg_weight: 0 }); // the user's values
  assert.deepEqual(fillPreset(edited, PRESETS, "Cross-Init", true), []);
  assert.equal(widgetValues(edited).steps, 50);
});

test("durations read as m:ss or h:mm:ss", () => {
  assert.equal(formatDuration(75), "1:15");
  assert.equal(formatDuration(3725), "1:02:05");
  assert.equal(formatDuration(NaN), "?");
});

test("progress events build the history; a re-queued run starts afresh", () => {
  let run = onStatus(undefined, { state: "running", step: 0, total: 4 });
  assert.equal(statusLine(run), "starting: encoding the photos");
  run = onProgress(run, { step: 1, total: 4, loss: 0.5, elapsed: 10 });
  run = onProgress(run, { step: 2, total: 4, loss: 0.25, elapsed: 20 });
  assert.equal(run.history.length, 2);
  assert.equal(timeLeft(run), 20);
  assert.equal(statusLine(run), "step 2/4   0:20 left   loss 0.2500");
  const again = onProgress(run, { step: 1, total: 4, loss: 0.9, elapsed: 1 });
  assert.deepEqual(again.history.map((h) => h.step), [1]);
});

test("the end of a run shows finished, cancelled or stopped with the reason", () => {
  let run = onProgress(undefined, { step: 4, total: 4, loss: 0.125, elapsed: 30 });
  const finished = onStatus(run, { state: "finished", reason: "", step: 4, total: 4, elapsed: 31 });
  assert.equal(statusLine(finished), "finished: 4 steps in 0:31   loss 0.1250");
  const cancelled = onStatus(run, { state: "cancelled", reason: "Cancel pressed", step: 2, total: 4 });
  assert.equal(statusLine(cancelled), "cancelled at step 2/4");
  const stopped = onStatus(run, { state: "stopped", reason: "out of memory at step 3", step: 2, total: 4 });
  assert.equal(statusLine(stopped), "stopped at step 2/4: out of memory at step 3");
  assert.equal(run.state, "running"); // events make new states; the old one is not changed
  run = onProgress(finished, { step: 1, total: 4, loss: 1, elapsed: 1 }); // the next run after a finished one
  assert.equal(run.state, "running");
  assert.equal(run.history.length, 1);
});

test("the chart spans the box, lowest loss at the bottom, flat when constant", () => {
  const points = chartPoints([3, 1, 2], 10, 100, 200, 60);
  assert.deepEqual(points.map(([x]) => x), [10, 110, 210]);
  assert.equal(points[0][1], 102); // the highest value 2 px under the top
  assert.equal(points[1][1], 158); // the lowest 2 px over the bottom
  assert.deepEqual(chartPoints([], 0, 0, 10, 10), []);
  assert.ok(chartPoints([1, 1], 0, 0, 10, 10).every(([, y]) => y === 8));
});
