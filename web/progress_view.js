// A run at a glance: status, step/total, loss, speed, ETA, the loss chart and the newest samples. The Train node's
// widget and an expanded run in the sidebar both show one.
import { el, setChildren } from "./dom.js";
import { runFileUrl } from "./finetune_api.js";
import { formatDuration, formatLoss, formatRate } from "./format.js";
import { LossChart } from "./loss_chart.js";
import { isActive } from "./run_state.js";

export function statusBadge(status) {
  return el("span", { class: `finetune-badge finetune-badge-${status ?? "none"}` }, status ?? "not started");
}

export class ProgressView {
  constructor({ emptyText = "" } = {}) {
    this.stats = el("div", { class: "finetune-stats" });
    this.canvas = el("canvas", { class: "finetune-chart" });
    this.samples = el("div", { class: "finetune-samples" });
    this.empty = el("div", { class: "finetune-empty" }, emptyText);
    this.element = el("div", { class: "finetune-progress" }, this.empty, this.stats, this.canvas, this.samples);
    this.chart = new LossChart(this.canvas);
    this.shownSamples = "";
    this.latest = null;
    this.frameRequested = false;
    this.show(null);
  }

  // Fast training sends many events a second: draw at most once per frame.
  render(state) {
    this.latest = state;
    if (this.frameRequested) return;
    this.frameRequested = true;
    requestAnimationFrame(() => {
      this.frameRequested = false;
      this.show(this.latest);
    });
  }

  show(state) {
    this.element.classList.toggle("finetune-progress-empty", !state);
    this.element.dataset.runId = state?.runId ?? "";
    this.element.dataset.status = state?.status ?? "";
    if (!state) return;
    this.renderStats(state);
    this.chart.update(state.lossPoints(), state.validationPoints());
    this.renderSamples(state);
  }

  renderStats(state) {
    const progress = state.progress ?? {};
    const running = isActive(state.status);
    const field = (name, text) => el("span", { class: `finetune-stat finetune-${name}`, dataset: { field: name } }, text);
    setChildren(this.stats,
      statusBadge(state.status),
      field("step", `step ${state.step} / ${state.total || "?"}`),
      field("loss", `loss ${formatLoss(progress.loss)}`),
      running && field("speed", formatRate(progress.it_s)),
      running && progress.eta_s != null && field("eta", `ETA ${formatDuration(progress.eta_s)}`),
    );
  }

  renderSamples(state) {
    const paths = state.latestSamples();
    const key = `${state.runId}:${paths.join("|")}`;
    if (key === this.shownSamples) return;
    this.shownSamples = key;
    this.samples.replaceChildren(
      ...paths.map((path) => {
        const url = runFileUrl(state.runId, path);
        return el("a", { href: url, target: "_blank", title: path.split(/[\\/]/).at(-1) },
          el("img", { src: url, alt: "sample" }));
      }),
    );
  }
}
