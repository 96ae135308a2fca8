// The live progress widget on Train nodes (every node type whose id starts with "FinetuneTrain").
import { app } from "../../scripts/app.js";
import { liveRuns } from "./live_runs.js";
import { ProgressView } from "./progress_view.js";
import { isActive } from "./run_state.js";

const TRAIN_NODE_PREFIX = "FinetuneTrain";
// Saved with the workflow, so that a reloaded graph shows the node's last run again.
const RUN_PROPERTY = "finetune_run_id";
const WIDGET_HEIGHT = 230;
const MIN_NODE_WIDTH = 380;

export function isTrainNode(node) {
  return String(node?.comfyClass ?? node?.type ?? "").startsWith(TRAIN_NODE_PREFIX);
}

export function addProgressWidget(node) {
  const view = new ProgressView({ emptyText: "Queue the workflow to train: step, loss, speed and samples show here." });
  const widget = node.addDOMWidget("finetune_progress", "finetune-progress", view.element, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => WIDGET_HEIGHT,
    getValue: () => "",
    setValue: () => {},
  });
  widget.serialize = false; // not an input: stays out of widgets_values and the queued prompt
  node.finetuneView = view;
  node.setSize([Math.max(node.size[0], MIN_NODE_WIDTH), node.computeSize()[1]]);
}

// After a graph load: show the run the node last showed, read back from the server.
export function restoreRun(node) {
  const runId = node.properties?.[RUN_PROPERTY];
  if (!isTrainNode(node) || !runId) return;
  liveRuns.load(runId).catch((error) => {
    console.info(`[finetune] run ${runId} of node ${node.id} is not available: ${error.message}`);
  });
}

// A run belongs on a node when the node showed it before, or when the node runs it now (live events name the node).
function showOnNodes(state, event) {
  const nodeId = String(event?.node_id ?? state.nodeId ?? "");
  for (const node of app.graph?.nodes ?? []) {
    if (!isTrainNode(node) || !node.finetuneView) continue;
    const showedIt = node.properties?.[RUN_PROPERTY] === state.runId;
    const runsIt = nodeId !== "" && String(node.id) === nodeId && (event != null || isActive(state.status));
    if (!showedIt && !runsIt) continue;
    node.properties ??= {};
    node.properties[RUN_PROPERTY] = state.runId;
    node.finetuneView.render(state);
    node.setDirtyCanvas?.(true, false);
  }
}

export function followRunsOnNodes() {
  liveRuns.subscribe(showOnNodes);
}
