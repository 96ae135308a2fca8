// One run in the Fine-tunes sidebar: a summary line; expanded, its loss chart, samples, result, error, memory plan
// and config, with the actions its status allows (Cancel, Resume, Add Apply LoRA to the graph).
import { actionButton, el, setChildren } from "./dom.js";
import { cancelRun, resumeRun } from "./finetune_api.js";
import { runAction, toast } from "./feedback.js";
import { formatDate, formatDuration } from "./format.js";
import { addApplyLora } from "./graph_actions.js";
import { liveRuns } from "./live_runs.js";
import { ProgressView, statusBadge } from "./progress_view.js";
import { isActive } from "./run_state.js";

const RESULT_LABELS = { lora: "LoRA", checkpoint: "Checkpoint", embedding: "Embedding", controlnet: "ControlNet" };

// What the memory planner picked, and its estimate against the memory it had (free GPU memory or the set budget).
function memoryLine(plan) {
  if (!plan) return null;
  const levers = plan.levers?.length ? plan.levers.join(", ") : "no memory levers";
  const budget = plan.budget_gb == null ? "" : ` of ${plan.budget_gb.toFixed(1)} GiB (${plan.budget_from})`;
  return el("div", { class: "finetune-run-memory", title: plan.text ?? "" },
    `Memory (${plan.mode}): ${levers}; estimate ${plan.estimate_gb.toFixed(1)} GiB${budget}`);
}

export class RunCard {
  constructor(state) {
    this.state = state;
    this.expanded = false;
    this.shownRecord = null;
    this.fetchedAt = Date.now(); // when the shown record's `duration` was measured
    this.badge = el("span");
    this.meta = el("div", { class: "finetune-run-meta" });
    this.title = el("span", { class: "finetune-run-name" });
    this.header = el("div", {
      class: "finetune-run-header", role: "button", tabindex: 0, "aria-expanded": "false",
      onclick: () => this.toggle(),
      onkeydown: (event) => (event.key === "Enter" || event.key === " ") && (event.preventDefault(), this.toggle()),
    },
      el("div", { class: "finetune-run-title" }, this.badge, this.title), this.meta);
    this.details = el("div", { class: "finetune-run-details" });
    this.element = el("div", { class: "finetune-run", dataset: { runId: state.runId } }, this.header, this.details);
    this.progress = null;
    this.detailsKey = null;
    this.update();
  }

  // A new record (the list was refreshed) or a new event.
  update() {
    const { state } = this;
    const record = state.record ?? {};
    if (state.record !== this.shownRecord) {
      this.shownRecord = state.record;
      this.fetchedAt = Date.now();
    }
    this.element.dataset.status = state.status ?? "";
    this.badge.replaceWith((this.badge = statusBadge(state.status)));
    this.title.textContent = record.name ?? state.runId;
    this.title.title = `${state.runId}\ncreated ${formatDate(record.created)}`;
    this.renderMeta();
    if (this.expanded) this.renderDetails();
  }

  renderMeta() {
    const record = this.state.record ?? {};
    const running = isActive(this.state.status) && record.started;
    // while it runs, the duration keeps counting from what the server last said
    const duration = record.duration == null ? null : record.duration + (running ? (Date.now() - this.fetchedAt) / 1000 : 0);
    const parts = [
      record.method,
      record.base_model,
      record.dataset_size ? `${record.dataset_size} images` : null,
      `${this.state.step || record.step || 0}/${this.state.total || record.steps || "?"} steps`,
      formatDuration(duration),
    ];
    this.meta.textContent = parts.filter(Boolean).join(" · ");
  }

  tick() {
    if (isActive(this.state.status)) this.renderMeta();
  }

  toggle() {
    this.expanded = !this.expanded;
    this.element.classList.toggle("finetune-run-expanded", this.expanded);
    this.header.setAttribute("aria-expanded", String(this.expanded));
    if (this.expanded) {
      this.renderDetails();
      liveRuns.load(this.state.runId).catch((error) => toast("error", "Could not load the run", error.message));
    } else {
      this.details.replaceChildren();
      this.progress = null;
      this.detailsKey = null;
    }
  }

  // The chart and samples follow every event; the rest is rebuilt only when the run's state changes, so that an
  // open Config stays open while the run trains.
  renderDetails() {
    const { state } = this;
    this.progress ??= new ProgressView();
    this.progress.render(state);
    const key = JSON.stringify([state.status, state.error, state.record?.outputs, Boolean(state.details),
      state.memoryPlan]);
    if (key === this.detailsKey) return;
    this.detailsKey = key;
    const record = state.record ?? {};
    // outputs: {<kind>: file name in its models folder, path, samples}; kind is lora, checkpoint, embedding...
    const kind = Object.keys(record.outputs ?? {}).find((key) => key !== "path" && key !== "samples");
    const message = state.error && el("div", {
      class: `finetune-run-message finetune-run-message-${state.status === "failed" ? "error" : "note"}`,
    }, state.error);
    const config = state.details?.config;
    setChildren(this.details,
      this.progress.element,
      message,
      kind && el("div", { class: "finetune-run-result" }, `${RESULT_LABELS[kind] ?? kind}: ${record.outputs[kind]}`),
      memoryLine(state.memoryPlan),
      this.actions(),
      config && el("details", { class: "finetune-run-config" },
        el("summary", {}, "Config"), el("pre", {}, JSON.stringify(config, null, 2))),
    );
  }

  actions() {
    const { state } = this;
    const lora = state.record?.outputs?.lora;
    return el("div", { class: "finetune-run-actions" },
      isActive(state.status) && actionButton("cancel", "Cancel", "pi pi-stop-circle", (b) => this.cancel(b)),
      state.status === "cancelled" && actionButton("resume", "Resume", "pi pi-play", (b) => this.resume(b)),
      state.status === "succeeded" && lora && actionButton("add-apply-lora", "Add ApplyLoRA to graph", "pi pi-plus",
        () => addApplyLora(lora)),
    );
  }

  async cancel(button) {
    const done = await runAction(button, () => cancelRun(this.state.runId), "Could not cancel the run");
    if (!done) return;
    button.disabled = true;
    button.lastChild.textContent = "Stopping…";
    toast("info", `Stopping ${this.state.record?.name ?? this.state.runId}`, "It saves a checkpoint first; Resume continues from it.");
  }

  async resume(button) {
    const done = await runAction(button, () => resumeRun(this.state.runId), "Could not resume the run");
    if (done) toast("success", `Queued ${this.state.record?.name ?? this.state.runId} again`, "It continues from its checkpoint.");
  }
}
