// The "Fine-tunes" sidebar tab: every training run, newest first, and the LoRA library.
import { app } from "../../scripts/app.js";
import { el } from "./dom.js";
import { toast } from "./feedback.js";
import { liveRuns } from "./live_runs.js";
import { LoraLibrary } from "./lora_library.js";
import { RunCard } from "./run_card.js";

export const TAB_ID = "finetune-runs";
const REFRESH_DELAY_MS = 300; // several events at a run's start or end: one refresh
const TICK_MS = 1000;

class FinetunesPanel {
  constructor() {
    this.cards = new Map();
    this.runList = el("div", { class: "finetune-run-list" });
    this.library = new LoraLibrary();
    this.element = el("div", { class: "finetune-panel" },
      el("div", { class: "finetune-panel-header" },
        el("h2", { class: "finetune-panel-title" }, "Fine-tunes"),
        el("button", { class: "finetune-button finetune-icon-button", type: "button", title: "Refresh",
          dataset: { action: "refresh" }, onclick: () => this.refresh() }, el("i", { class: "pi pi-refresh" }))),
      el("section", { class: "finetune-section" }, el("h3", { class: "finetune-section-title" }, "Runs"), this.runList),
      this.library.element);
    this.refreshTimer = null;
    this.ticker = null;
    this.unsubscribe = null;
  }

  mount(container) {
    container.append(this.element);
    this.unsubscribe = liveRuns.subscribe((state, event) => this.onRun(state, event));
    this.ticker = setInterval(() => this.cards.forEach((card) => card.tick()), TICK_MS);
    this.refresh();
  }

  unmount() {
    this.unsubscribe?.();
    clearInterval(this.ticker);
    clearTimeout(this.refreshTimer);
    this.element.remove();
  }

  onRun(state, event) {
    const card = this.cards.get(state.runId);
    if (card) card.update();
    // a run that starts, ends or is new to the list changes the list (and maybe the library)
    if (!card || event?.event === "run") this.scheduleRefresh();
  }

  scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => this.refresh(), REFRESH_DELAY_MS);
  }

  async refresh() {
    try {
      const [records] = await Promise.all([liveRuns.refreshRecords(), this.library.refresh()]);
      this.showRuns(records);
    } catch (error) {
      toast("error", "Could not load the fine-tunes", error.message);
    }
  }

  showRuns(records) {
    const cards = records.map((record) => {
      let card = this.cards.get(record.id);
      if (!card) {
        card = new RunCard(liveRuns.state(record.id));
        this.cards.set(record.id, card);
      }
      card.update();
      return card;
    });
    const listed = new Set(records.map((record) => record.id));
    for (const id of this.cards.keys()) if (!listed.has(id)) this.cards.delete(id);
    this.runList.replaceChildren(...(cards.length
      ? cards.map((card) => card.element)
      : [el("div", { class: "finetune-empty" }, "No runs yet: queue a workflow with a Train LoRA or Train Checkpoint node.")]));
  }
}

export function registerFinetunesTab() {
  const panel = new FinetunesPanel();
  // The sidebar-tab store (frontend 1.32 and later); extensionManager.registerSidebarTab is its deprecated alias.
  const sidebarTabs = app.extensionManager.sidebarTab ?? app.extensionManager;
  sidebarTabs.registerSidebarTab({
    id: TAB_ID,
    icon: "pi pi-chart-line",
    title: "Fine-tunes",
    tooltip: "Fine-tunes: training runs and the LoRAs they made",
    type: "custom",
    render: (container) => panel.mount(container),
    destroy: () => panel.unmount(),
  });
}
