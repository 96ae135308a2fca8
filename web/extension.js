// comfyui-finetune's frontend: live progress on Train nodes and the "Fine-tunes" sidebar.
import { app } from "../../scripts/app.js";
import { ensureStyles } from "./dom.js";
import { liveRuns } from "./live_runs.js";
import { addProgressWidget, followRunsOnNodes, isTrainNode, restoreRun } from "./node_widget.js";
import { registerFinetunesTab } from "./sidebar.js";

app.registerExtension({
  name: "comfyui-finetune.dashboard",

  setup() {
    ensureStyles();
    followRunsOnNodes();
    liveRuns.start();
    registerFinetunesTab();
  },

  nodeCreated(node) {
    if (isTrainNode(node)) addProgressWidget(node);
  },

  loadedGraphNode(node) {
    restoreRun(node);
  },
});
