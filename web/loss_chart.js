// A loss chart on a <canvas>: raw loss per step (thin), its smoothed curve (bold), validation loss (dots).

const RAW_COLOR = "rgba(110, 160, 255, 0.55)";
const SMOOTH_COLOR = "#ffaa33";
const VALIDATION_COLOR = "#5ed17f";
const PADDING = { left: 44, right: 8, top: 8, bottom: 18 };

// TensorBoard-style exponential moving average, debiased so the curve starts at the first value. Longer runs get
// a heavier weight, so the curve stays readable whatever the number of steps.
export function smooth(values) {
  const weight = Math.min(0.98, Math.max(0.6, 1 - 10 / Math.max(values.length, 1)));
  let last = 0;
  return values.map((value, i) => {
    last = last * weight + (1 - weight) * value;
    return last / (1 - weight ** (i + 1));
  });
}

export class LossChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.points = [];
    this.validation = [];
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  // points, validation: [{step, loss}] in step order. The x axis spans the steps trained so far.
  update(points, validation = []) {
    this.points = points;
    this.validation = validation;
    this.draw();
  }

  draw() {
    const { canvas } = this;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    const ratio = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const text = getComputedStyle(canvas).color || "#ccc";
    ctx.font = "10px sans-serif";
    ctx.fillStyle = text;
    if (!this.points.length) {
      ctx.textAlign = "center";
      ctx.fillText("the loss appears with the first steps", width / 2, height / 2);
      return;
    }
    const frame = this.frame(width, height);
    this.drawAxes(ctx, frame, text);
    const steps = this.points.map((p) => p.step);
    this.drawLine(ctx, frame, steps, this.points.map((p) => p.loss), RAW_COLOR, 1);
    this.drawLine(ctx, frame, steps, smooth(this.points.map((p) => p.loss)), SMOOTH_COLOR, 2);
    ctx.fillStyle = VALIDATION_COLOR;
    for (const { step, loss } of this.validation) {
      ctx.beginPath();
      ctx.arc(frame.x(step), frame.y(loss), 2.5, 0, 2 * Math.PI);
      ctx.fill();
    }
  }

  frame(width, height) {
    const losses = [...this.points, ...this.validation].map((p) => p.loss);
    let low = losses.reduce((a, b) => Math.min(a, b));
    let high = losses.reduce((a, b) => Math.max(a, b));
    const margin = (high - low) * 0.05 || Math.abs(high) * 0.05 || 1;
    low -= margin;
    high += margin;
    const first = this.points[0].step;
    const last = Math.max(this.points.at(-1).step, first + 1);
    const plotWidth = width - PADDING.left - PADDING.right;
    const plotHeight = height - PADDING.top - PADDING.bottom;
    return {
      low, high, first, last, width, height,
      x: (step) => PADDING.left + ((step - first) / (last - first)) * plotWidth,
      y: (loss) => PADDING.top + (1 - (loss - low) / (high - low)) * plotHeight,
    };
  }

  drawAxes(ctx, frame, color) {
    ctx.strokeStyle = "rgba(128, 128, 128, 0.25)";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    ctx.fillStyle = color;
    for (let i = 0; i <= 3; i++) {
      const loss = frame.low + ((frame.high - frame.low) * i) / 3;
      const y = Math.round(frame.y(loss)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(PADDING.left, y);
      ctx.lineTo(frame.width - PADDING.right, y);
      ctx.stroke();
      ctx.fillText(loss.toPrecision(3), PADDING.left - 4, y);
    }
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText(`step ${frame.first}`, PADDING.left, frame.height - 4);
    ctx.textAlign = "right";
    ctx.fillText(`${frame.last}`, frame.width - PADDING.right, frame.height - 4);
  }

  drawLine(ctx, frame, steps, values, color, lineWidth) {
    ctx.strokeStyle = color;
    ctx.lineWidth = lineWidth;
    ctx.lineJoin = "round";
    ctx.beginPath();
    values.forEach((value, i) => {
      const x = frame.x(steps[i]);
      const y = frame.y(value);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    if (values.length === 1) ctx.arc(frame.x(steps[0]), frame.y(values[0]), lineWidth, 0, 2 * Math.PI);
    ctx.stroke();
  }
}
