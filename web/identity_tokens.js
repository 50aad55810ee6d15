// Identity Tokens front-end: a live loss chart and step counter drawn on the Train Identity Token node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODE = "IdentityTokens_TrainIdentityToken";
const SIMILARITY_NODE = "IdentityTokens_FaceSimilarity";
const CHART_HEIGHT = 60;
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

function drawLossChart(ctx, node, history) {
  // Sparkline of the loss so far, under the widgets, with the latest step and loss as text.
  const last = history[history.length - 1];
  const width = node.size[0] - 20;
  const top = node.size[1] - CHART_HEIGHT - 22;
  const values = history.map((h) => h.loss);
  const low = Math.min(...values);
  const high = Math.max(...values);
  const span = high - low || 1;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(10, top, width, CHART_HEIGHT);
  ctx.strokeStyle = "#6cf";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = 10 + (values.length > 1 ? (i / (values.length - 1)) * width : 0);
    const y = top + CHART_HEIGHT - ((v - low) / span) * (CHART_HEIGHT - 4) - 2;
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#ddd";
  ctx.font = "12px sans-serif";
  ctx.fillText(`step ${last.step}/${last.total}   loss ${last.loss.toFixed(4)}`, 12, top + CHART_HEIGHT + 15);
  ctx.restore();
}

app.registerExtension({
  name: "IdentityTokens.LossChart",
  setup() {
    api.addEventListener("identity_tokens.progress", ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node));
      if (!node) return;
      if (!node.identityTokensHistory || detail.step <= 1) node.identityTokensHistory = [];
      node.identityTokensHistory.push(detail);
      if (node.identityTokensHistory.length > 2000) node.identityTokensHistory.shift();
      const needed = CHART_HEIGHT + 30;
      if (!node.identityTokensResized) {
        node.setSize([node.size[0], node.size[1] + needed]);
        node.identityTokensResized = true;
      }
      node.setDirtyCanvas(true, false);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === SIMILARITY_NODE) showReport(nodeType);
    if (nodeData.name !== TRAIN_NODE) return;
    const original = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      original?.apply(this, arguments);
      if (this.flags?.collapsed || !this.identityTokensHistory?.length) return;
      drawLossChart(ctx, this, this.identityTokensHistory);
    };
  },
});
