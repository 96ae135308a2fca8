// One place that knows every run the page has seen: fed by ComfyUI's websocket (finetune.* events), caught up from
// the server's event log, and polled only while the websocket has been quiet with work going on.
import { api } from "../../scripts/api.js";
import { fetchEvents, fetchRun, fetchRuns } from "./finetune_api.js";
import { RunState, isActive } from "./run_state.js";

const LIVE_EVENTS = ["finetune.progress", "finetune.sample", "finetune.status"];
const POLL_MS = 3000;
const QUIET_MS = 8000; // no live event for this long while something runs: fall back to polling

class LiveRuns {
  constructor() {
    this.states = new Map();
    this.listeners = new Set();
    this.loading = new Map();
    this.lastLiveEvent = 0;
    this.queueBusy = false;
    this.started = false;
  }

  start() {
    if (this.started) return;
    this.started = true;
    for (const type of LIVE_EVENTS) api.addEventListener(type, (event) => this.onLive(event.detail));
    api.addEventListener("status", (event) => {
      this.queueBusy = (event.detail?.exec_info?.queue_remaining ?? 0) > 0;
    });
    setInterval(() => this.pollIfQuiet(), POLL_MS);
    this.catchUpActive();
  }

  // Runs that were already training when the page (re)loaded.
  async catchUpActive() {
    try {
      const records = await this.refreshRecords();
      await Promise.all(records.filter((record) => isActive(record.status)).map((record) => this.load(record.id)));
    } catch (error) {
      console.warn("[finetune] could not read the runs", error);
    }
  }

  // listener(state, event): event is the live event, or null after a catch-up from the server.
  subscribe(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  state(runId) {
    if (!this.states.has(runId)) this.states.set(runId, new RunState(runId));
    return this.states.get(runId);
  }

  onLive(detail) {
    if (!detail?.run_id) return;
    this.lastLiveEvent = Date.now();
    const state = this.state(detail.run_id);
    state.apply(detail);
    this.notify(state, detail);
    if (detail.event === "run" || !state.record) this.load(detail.run_id);
  }

  // The run's record and every event not seen yet; concurrent calls for one run share one request.
  load(runId) {
    if (!this.loading.has(runId)) {
      const done = this.fetchState(runId).finally(() => this.loading.delete(runId));
      this.loading.set(runId, done);
    }
    return this.loading.get(runId);
  }

  async fetchState(runId) {
    const state = this.state(runId);
    const [body, { events, next }] = await Promise.all([fetchRun(runId), fetchEvents(runId, state.nextOffset)]);
    state.applyAll(events);
    state.nextOffset = next;
    state.setRecord(body.run);
    state.details = { config: body.config, resumable: body.resumable, hasCheckpoint: body.has_checkpoint };
    this.notify(state, null);
    return state;
  }

  // Records of every run (the sidebar's list); their states are brought up to date too.
  async refreshRecords() {
    const records = await fetchRuns();
    for (const record of records) {
      const known = this.states.has(record.id);
      const state = this.state(record.id);
      const before = state.status;
      state.setRecord(record);
      if (!known || before !== record.status) this.notify(state, null);
    }
    return records;
  }

  notify(state, event) {
    for (const listener of this.listeners) {
      try {
        listener(state, event);
      } catch (error) {
        console.error("[finetune] dashboard listener failed", error);
      }
    }
  }

  async pollIfQuiet() {
    if (Date.now() - this.lastLiveEvent < QUIET_MS) return;
    const active = [...this.states.values()].filter((state) => isActive(state.status));
    if (!active.length && !this.queueBusy) return;
    try {
      await this.refreshRecords();
      const nowActive = [...this.states.values()].filter((state) => isActive(state.status));
      await Promise.all([...new Set([...active, ...nowActive])].map((state) => this.load(state.runId)));
    } catch (error) {
      console.warn("[finetune] polling the runs failed", error);
    }
  }
}

export const liveRuns = new LiveRuns();
