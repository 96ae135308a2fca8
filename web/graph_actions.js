// Changes the dashboard makes to the open graph.
import { app } from "../../scripts/app.js";
import { toast } from "./feedback.js";

const APPLY_LORA_NODE = "FinetuneApplyLoRA";

// Add an Apply LoRA node in the middle of the visible canvas, its `lora_name` set to `loraName`.
export function addApplyLora(loraName) {
  try {
    addApplyLoraNode(loraName);
    toast("success", "Added Apply LoRA", loraName);
  } catch (error) {
    toast("error", "Could not add Apply LoRA", error.message);
  }
}

function addApplyLoraNode(loraName) {
  const node = window.LiteGraph.createNode(APPLY_LORA_NODE);
  if (!node) throw new Error(`the ${APPLY_LORA_NODE} node is not installed in this ComfyUI`);
  const widget = node.widgets?.find((w) => w.name === "lora_name");
  if (!widget) throw new Error(`${APPLY_LORA_NODE} has no lora_name input`);
  const choices = widget.options?.values;
  // A LoRA trained since the page loaded is not in the list the page was given yet.
  if (Array.isArray(choices) && !choices.includes(loraName)) choices.push(loraName);
  widget.value = loraName;
  widget.callback?.(loraName);
  const [x, y, width, height] = app.canvas.visible_area ?? [0, 0, 800, 600];
  node.pos = [x + width / 2 - node.size[0] / 2, y + height / 2 - node.size[1] / 2];
  app.graph.add(node);
  app.canvas.selectNode?.(node);
  app.graph.setDirtyCanvas(true, true);
  return node;
}
