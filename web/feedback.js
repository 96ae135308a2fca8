// Telling the user what happened, and asking before anything is deleted, with ComfyUI's own toasts and dialogs.
import { app } from "../../scripts/app.js";

const TOAST_LIFE_MS = { success: 3000, info: 4000, warn: 6000, error: 8000 };

export function toast(severity, summary, detail = "") {
  const toasts = app.extensionManager?.toast;
  if (toasts) toasts.add({ severity, summary, detail, life: TOAST_LIFE_MS[severity] });
  else console.log(`[finetune] ${summary}${detail ? `: ${detail}` : ""}`);
}

export async function confirmDelete(title, message) {
  const dialog = app.extensionManager?.dialog;
  if (dialog?.confirm) return (await dialog.confirm({ title, message, type: "delete" })) === true;
  return window.confirm(`${title}\n\n${message}`);
}

// Run an action for a button: disabled while it runs, failures shown as a toast.
export async function runAction(button, action, failure) {
  button.disabled = true;
  try {
    return await action();
  } catch (error) {
    toast("error", failure, error.message);
    return undefined;
  } finally {
    button.disabled = false;
  }
}
