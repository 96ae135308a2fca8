// What the dashboard knows about one run, built from its events: the same events arrive live (websocket) and from
// the run's events.jsonl (on page load, and when polling), so applying an event twice changes nothing.

export const ACTIVE_STATUSES = ["queued", "running"];

export const isActive = (status) => ACTIVE_STATUSES.includes(status);

export class RunState {
  constructor(runId) {
    this.runId = runId;
    this.record = null; // the run record, when fetched
    this.details = null; // {config, resumable, hasCheckpoint} from GET /finetune/runs/{id}
    this.losses = new Map(); // step -> raw loss
    this.validation = new Map(); // step -> validation loss
    this.progress = null; // the newest progress event
    this.samples = []; // [{step, paths}] oldest first
    this.memoryPlan = null; // the plan event's memory_plan: {mode, levers, estimate_gb, budget_gb, budget_from, text}
    this.status = null;
    this.nodeId = null; // the Train node that runs it, as ComfyUI numbers it in the queued graph
    this.error = "";
    this.nextOffset = 0; // where in events.jsonl to read from next (the last answer's `next`)
  }

  setRecord(record) {
    this.record = record;
    this.status = record.status;
    this.error = record.error || "";
    this.nodeId = record.node_id || this.nodeId;
    if (!this.progress && record.step) {
      this.progress = { step: record.step, total: record.steps, loss: record.loss };
    }
  }

  apply(event) {
    if (event.run_status) this.status = event.run_status;
    if (event.node_id) this.nodeId = String(event.node_id);
    switch (event.event) {
      case "progress":
        if (Number.isFinite(event.loss)) this.losses.set(event.step, event.loss);
        if (!this.progress || event.step >= (this.progress.step ?? 0)) this.progress = event;
        break;
      case "plan":
        this.progress = { ...this.progress, total: event.steps ?? this.progress?.total };
        this.memoryPlan = event.memory_plan ?? this.memoryPlan;
        break;
      case "validation":
        if (Number.isFinite(event.loss)) this.validation.set(event.step, event.loss);
        break;
      case "sample":
        if (!this.samples.some((s) => s.step === event.step)) {
          this.samples.push({ step: event.step, paths: event.paths ?? [] });
          this.samples.sort((a, b) => a.step - b.step);
        }
        break;
      case "error":
        this.error = event.message ?? this.error;
        break;
      case "run":
        if (event.error !== undefined) this.error = event.error;
        break;
    }
  }

  applyAll(events) {
    for (const event of events) this.apply(event);
  }

  get step() {
    return this.progress?.step ?? 0;
  }

  get total() {
    return this.progress?.total ?? this.record?.steps ?? 0;
  }

  lossPoints() {
    return [...this.losses.entries()].sort((a, b) => a[0] - b[0]).map(([step, loss]) => ({ step, loss }));
  }

  validationPoints() {
    return [...this.validation.entries()].sort((a, b) => a[0] - b[0]).map(([step, loss]) => ({ step, loss }));
  }

  latestSamples() {
    const newest = this.samples.at(-1);
    if (newest) return newest.paths;
    return this.record?.outputs?.samples ?? [];
  }
}
