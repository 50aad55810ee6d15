// Identity Tokens front-end: a live loss chart and step counter drawn on the Train Identity Token node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODE = "IdentityTokens_TrainIdentityToken";
const CHART_HEIGHT = 60;

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
    if (nodeData.name !== TRAIN_NODE) return;
    const original = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      original?.apply(this, arguments);
      if (this.flags?.collapsed || !this.identityTokensHistory?.length) return;
      drawLossChart(ctx, this, this.identityTokensHistory);
    };
  },
});
