// The LoRA library in the Fine-tunes sidebar: the files in models/loras that our runs made, with their trigger word
// and what their metadata says; add one to the graph, or delete it (after a confirmation).
import { actionButton, el } from "./dom.js";
import { deleteLora, fetchLoras } from "./finetune_api.js";
import { confirmDelete, runAction, toast } from "./feedback.js";
import { addApplyLora } from "./graph_actions.js";

const FAMILY_NAMES = { sd1: "SD1.x", sd2: "SD2.x", sdxl: "SDXL" };

function summary(metadata = {}) {
  return [
    FAMILY_NAMES[metadata.family] ?? metadata.family,
    metadata.rank && `rank ${metadata.rank}`,
    metadata.steps && `${metadata.steps} steps`,
    metadata.resolution,
    metadata.images && `${metadata.images} images`,
    metadata.size_mb != null && `${metadata.size_mb} MB`,
  ].filter(Boolean).join(" · ");
}

export class LoraLibrary {
  constructor() {
    this.list = el("div", { class: "finetune-lora-list" });
    this.element = el("section", { class: "finetune-section finetune-loras" },
      el("h3", { class: "finetune-section-title" }, "LoRA library"), this.list);
  }

  async refresh() {
    const loras = await fetchLoras();
    this.list.replaceChildren(...(loras.length
      ? loras.map((lora) => this.row(lora))
      : [el("div", { class: "finetune-empty" }, "No LoRAs yet: a finished Train LoRA run puts its file here.")]));
  }

  row(lora) {
    return el("div", { class: "finetune-lora", dataset: { lora: lora.name } },
      el("div", { class: "finetune-lora-name", title: lora.path }, lora.name),
      lora.trigger_word && el("div", { class: "finetune-lora-trigger" }, "trigger: ", el("code", {}, lora.trigger_word)),
      el("div", { class: "finetune-run-meta" }, summary(lora.metadata)),
      el("div", { class: "finetune-run-actions" },
        actionButton("add-apply-lora", "Add to graph", "pi pi-plus", () => addApplyLora(lora.name)),
        actionButton("delete", "Delete", "pi pi-trash", (b) => this.remove(b, lora))),
    );
  }

  async remove(button, lora) {
    const sure = await confirmDelete("Delete LoRA",
      `Delete ${lora.name} from models/loras? Its training run stays listed; the file cannot be brought back.`);
    if (!sure) return;
    const done = await runAction(button, () => deleteLora(lora.name), `Could not delete ${lora.name}`);
    if (!done) return;
    toast("success", `Deleted ${lora.name}`);
    await this.refresh();
  }
}
