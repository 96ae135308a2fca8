// How numbers, times and states read in the dashboard.

export function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${s}s`;
}

export function formatLoss(loss) {
  if (loss == null || !Number.isFinite(loss)) return "–";
  return Math.abs(loss) >= 100 || (loss !== 0 && Math.abs(loss) < 0.001) ? loss.toExponential(2) : loss.toFixed(4);
}

export function formatRate(itPerSecond) {
  if (!itPerSecond || !Number.isFinite(itPerSecond)) return "–";
  return itPerSecond >= 1 ? `${itPerSecond.toFixed(2)} it/s` : `${(1 / itPerSecond).toFixed(1)} s/it`;
}

export function formatDate(epochSeconds) {
  if (!epochSeconds) return "";
  return new Date(epochSeconds * 1000).toLocaleString(undefined, {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
  });
}
