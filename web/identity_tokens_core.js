// Identity Tokens front-end logic with no ComfyUI imports, so node's test runner can test it (tests/js/).
// identity_tokens.js wires these functions into ComfyUI; this module only exports, it registers nothing.

export const PRESET_WIDGETS = ["steps", "learning_rate", "batch_size", "reg_weight"];
export const PRESET_SENTINELS = { steps: 0, learning_rate: 0, batch_size: 0, reg_weight: -1 }; // "the preset's value"
export const HISTORY_LIMIT = 2000;

export function presetTable(nodeData) {
  // The preset values the server lists in the preset input's options: {name: {steps, learning_rate, ...}}.
  const preset = nodeData?.input?.required?.preset;
  return (Array.isArray(preset) && preset[1]?.presets) || {};
}

export function fillPreset(node, presets, name, onlySentinels = false) {
  // Set the preset widgets to the preset's values; with onlySentinels, only those still saying "the preset's"
  // (a workflow saved before the widgets showed real values). Returns the names of the widgets changed.
  const values = presets[name];
  if (!values) return [];
  const changed = [];
  for (const widget of node.widgets ?? []) {
    if (!PRESET_WIDGETS.includes(widget.name) || !(widget.name in values)) continue;
    if (onlySentinels && widget.value !== PRESET_SENTINELS[widget.name]) continue;
    if (widget.value !== values[widget.name]) {
      widget.value = values[widget.name];
      changed.push(widget.name);
    }
  }
  return changed;
}

export function formatDuration(seconds) {
  // 75 -> "1:15", 3725 -> "1:02:05"; unknown -> "?".
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  const whole = Math.round(seconds);
  const h = Math.floor(whole / 3600);
  const m = Math.floor((whole % 3600) / 60);
  const s = String(whole % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
}

export function newRun() {
  // The live view's state of one node: the loss history and how the run stands.
  return { history: [], state: "idle", reason: "", elapsed: 0 };
}

export function onProgress(run, detail) {
  // A step finished: a step at or before the first starts a new run (a re-queue). Returns the run to keep.
  const fresh = run === undefined || run.state !== "running" || detail.step <= (run.history.at(-1)?.step ?? 0);
  const next = fresh ? { ...newRun(), state: "running" } : run;
  next.history.push({ step: detail.step, total: detail.total, loss: detail.loss });
  if (next.history.length > HISTORY_LIMIT) next.history.shift();
  next.elapsed = detail.elapsed ?? next.elapsed;
  return next;
}

export function onStatus(run, detail) {
  // Training ended (finished, cancelled or stopped) or started (running, before the first step).
  const next = detail.state === "running" ? { ...newRun(), state: "running" } : { ...(run ?? newRun()) };
  next.state = detail.state;
  next.reason = detail.reason ?? "";
  if (detail.elapsed !== undefined) next.elapsed = detail.elapsed;
  if (detail.step !== undefined) next.step = detail.step;
  if (detail.total !== undefined) next.total = detail.total;
  return next;
}

export function timeLeft(run) {
  // Seconds left at the pace so far, or NaN before any step.
  const last = run.history.at(-1);
  if (!last || !last.step || !run.elapsed) return NaN;
  return (run.elapsed / last.step) * (last.total - last.step);
}

export const STATE_COLOURS = { running: "#ddd", finished: "#7d7", cancelled: "#eb5", stopped: "#f77", idle: "#aaa" };

export function statusLine(run) {
  // The text under the chart: progress while running, then how the run ended.
  const last = run.history.at(-1);
  const step = run.step ?? last?.step ?? 0;
  const total = run.total ?? last?.total ?? 0;
  const loss = last ? `   loss ${last.loss.toFixed(4)}` : "";
  if (run.state === "running") {
    if (!last) return "starting: encoding the photos";
    return `step ${last.step}/${last.total}   ${formatDuration(timeLeft(run))} left${loss}`;
  }
  if (run.state === "finished") return `finished: ${total} steps in ${formatDuration(run.elapsed)}${loss}`;
  if (run.state === "cancelled") return `cancelled at step ${step}/${total}`;
  if (run.state === "stopped") return `stopped at step ${step}/${total}: ${run.reason}`;
  return "";
}

export function chartPoints(values, left, top, width, height) {
  // Polyline points of a sparkline of values inside the box (2 px margin top and bottom); flat when all equal.
  if (!values.length) return [];
  const low = Math.min(...values);
  const span = Math.max(...values) - low || 1;
  return values.map((v, i) => [
    left + (values.length > 1 ? (i / (values.length - 1)) * width : 0),
    top + height - ((v - low) / span) * (height - 4) - 2,
  ]);
}
