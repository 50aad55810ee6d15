// Identity Tokens front-end: preset values in the training widgets, and a live view (loss chart, step, time left,
// how the run ended) on the Train Identity Token node. The logic lives in identity_tokens_core.js (unit-tested).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { STATE_COLOURS, chartPoints, fillPreset, onProgress, onStatus, presetTable, statusLine } from "./identity_tokens_core.js";

const TRAIN_NODE = "IdentityTokens_TrainIdentityToken";
const SIMILARITY_NODE = "IdentityTokens_FaceSimilarity";
const CHART_HEIGHT = 60;
const LIVE_WIDGET = "identity_tokens_live_view";
const REPORT_LINE = 15;

function drawReport(ctx, node, lines) {
  // The Face Similarity report under the widgets, one line per row, clipped to the node's width.
  const top = node.size[1] - lines.length * REPORT_LINE - 8;
  ctx.save();
  ctx.fillStyle = "#ddd";
  ctx.font = "12px monospace";
  lines.forEach((line, i) => ctx.fillText(line, 10, top + (i + 1) * REPORT_LINE, node.size[0] - 20));
  ctx.restore();
}

function showReport(nodeType) {
  // Keep the text a run sent back (ui.text) and draw it on the node, growing the node to fit.
  const executed = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    executed?.apply(this, arguments);
    const lines = (message?.text ?? []).join("\n").split("\n").slice(0, 20);
    const grow = lines.length * REPORT_LINE + 12 - (this.identityTokensReport?.length ?? 0) * REPORT_LINE;
    this.identityTokensReport = lines;
    if (grow > 0) this.setSize([Math.max(this.size[0], 360), this.size[1] + grow]);
    this.setDirtyCanvas(true, false);
  };
  const draw = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx) {
    draw?.apply(this, arguments);
    if (this.flags?.collapsed || !this.identityTokensReport?.length) return;
    drawReport(ctx, this, this.identityTokensReport);
  };
}

function drawLiveView(ctx, run, width, top) {
  // The loss sparkline and a line saying how the run stands (colour by state), in the live widget's box.
  const inner = width - 20;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(10, top + 4, inner, CHART_HEIGHT);
  const points = chartPoints(run.history.map((h) => h.loss), 10, top + 4, inner, CHART_HEIGHT);
  if (points.length) {
    ctx.strokeStyle = "#6cf";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    points.forEach(([x, y], i) => (i === 0 ? ctx.moveTo(x, y) : ctx.lineTo(x, y)));
    ctx.stroke();
  }
  ctx.fillStyle = STATE_COLOURS[run.state] ?? "#ddd";
  ctx.font = "12px sans-serif";
  ctx.fillText(statusLine(run), 12, top + CHART_HEIGHT + 19, inner);
  ctx.restore();
}

function liveWidget(node) {
  // The live view as a widget under the others (not saved, not sent), so ComfyUI puts the finished run's attention
  // heatmap below it instead of over it. Added at the node's first training event.
  const existing = node.widgets?.find((w) => w.name === LIVE_WIDGET);
  if (existing) return existing;
  const widget = node.addCustomWidget({
    name: LIVE_WIDGET,
    type: "identity_tokens_live",
    value: "",
    options: { serialize: false },
    serialize: false,
    draw(ctx, owner, width, y) {
      if (owner.identityTokensRun) drawLiveView(ctx, owner.identityTokensRun, width, y);
    },
    computeSize(width) {
      return [width, CHART_HEIGHT + 28];
    },
  });
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  return widget;
}

function updateRun(detail, change) {
  // Apply one server event to its node's live view and redraw.
  const node = app.graph.getNodeById(Number(detail.node));
  if (!node) return;
  node.identityTokensRun = change(node.identityTokensRun, detail);
  liveWidget(node);
  node.setDirtyCanvas(true, true);
}

function fillPresets(nodeType, nodeData) {
  // Preset widgets show the chosen preset's real values: on a new node, on choosing a preset, and on loading a
  // workflow saved when 0 / -1 meant "the preset's" (the server still reads 0 / -1 that way).
  const presets = presetTable(nodeData);
  const created = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    created?.apply(this, arguments);
    const chooser = this.widgets?.find((w) => w.name === "preset");
    if (!chooser) return;
    fillPreset(this, presets, chooser.value);
    const chosen = chooser.callback;
    const node = this;
    chooser.callback = function (value) {
      const result = chosen?.apply(this, arguments);
      if (fillPreset(node, presets, value ?? chooser.value).length) node.setDirtyCanvas(true, true);
      return result;
    };
  };
  const configured = nodeType.prototype.onConfigure;
  nodeType.prototype.onConfigure = function () {
    configured?.apply(this, arguments);
    const chooser = this.widgets?.find((w) => w.name === "preset");
    if (chooser) fillPreset(this, presets, chooser.value, true);
  };
}

app.registerExtension({
  name: "IdentityTokens.LiveView",
  setup() {
    api.addEventListener("identity_tokens.progress", ({ detail }) => updateRun(detail, onProgress));
    api.addEventListener("identity_tokens.status", ({ detail }) => updateRun(detail, onStatus));
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === SIMILARITY_NODE) showReport(nodeType);
    if (nodeData.name !== TRAIN_NODE) return;
    fillPresets(nodeType, nodeData);
  },
});
