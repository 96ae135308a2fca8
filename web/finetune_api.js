// The pack's HTTP routes (/finetune/...), as promises of their JSON; a failed request throws its server message.
import { api } from "../../scripts/api.js";

async function request(path, options = {}) {
  const response = await api.fetchApi(`/finetune${path}`, options);
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: the status below says what went wrong
  }
  if (!response.ok) throw new Error(body?.error ?? `${options.method ?? "GET"} /finetune${path}: HTTP ${response.status}`);
  return body;
}

const runPath = (runId) => `/runs/${encodeURIComponent(runId)}`;

// What the routes ask of a request that changes something, so that another web page cannot send it.
const changing = (method, body = {}) => ({
  method,
  headers: { "Content-Type": "application/json", "X-Finetune-Request": "1" },
  body: JSON.stringify(body),
});

export const fetchRuns = async () => (await request("/runs")).runs;
export const fetchRun = (runId) => request(runPath(runId));
// `since`: the `next` of the previous answer (where in the run's event log it stopped reading).
export const fetchEvents = (runId, since = 0) => request(`${runPath(runId)}/events?since=${since}`);
export const cancelRun = (runId) => request(`${runPath(runId)}/cancel`, changing("POST"));
export const resumeRun = (runId) =>
  request(`${runPath(runId)}/resume`, changing("POST", { client_id: api.clientId }));
export const fetchLoras = async () => (await request("/loras")).loras;
export const deleteLora = (name) => request(`/loras/${encodeURIComponent(name)}`, changing("DELETE"));

// The URL of a file in a run's folder. Sample paths arrive absolute (as the trainer wrote them) or relative to the
// run folder (as the run record keeps them); both become relative to the run folder.
export function runFileUrl(runId, path) {
  const parts = String(path).split(/[\\/]/);
  const inRun = parts.lastIndexOf(runId);
  const relative = inRun >= 0 ? parts.slice(inRun + 1) : parts;
  return api.apiURL(`/finetune${runPath(runId)}/files/${relative.map(encodeURIComponent).join("/")}`);
}
