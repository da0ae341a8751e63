"""Line charts drawn with Pillow (no plotting dependency): the runs' loss curves and the experiments' comparisons."""
import math

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (214, 39, 40), (255, 127, 14), (44, 160, 44), (148, 103, 189), (0, 0, 0),
          (140, 86, 75), (227, 119, 194), (23, 190, 207)]


def font(size):
    return ImageFont.load_default(size=size)


def nice_ticks(lo, hi, n=5):
    """About n round values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)]


def chart(series, title, ylabel, xlabel="training step", log=False, ylim=None, legend=None, size=(760, 320),
          legend_names=()):
    """A line chart of {name: [(x, y), ...]} as a PIL image: ticks, axis names and a legend (by default with more
    than one series). log: log10 y axis over whole decades. ylim: (low, high), else the data's range rounded out
    to ticks. legend_names: more names the legend must have room for, so that stacked charts line up."""
    ys = [y for pts in series.values() for _, y in pts if not log or y > 0]
    lo, hi = ylim or (min(ys), max(ys))
    if log:
        lo, hi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        hi += hi == lo
        yticks = [e + math.log10(m) for e in range(lo, hi) for m in ((1, 2, 5) if hi - lo <= 3 else (1,))] + [hi]
    else:
        hi += (hi == lo) * max(1e-3, abs(hi) * 0.1)
        yticks = nice_ticks(lo, hi)
        lo, hi = (lo, hi) if ylim else (yticks[0], yticks[-1])
        yticks = [v for v in yticks if lo <= v <= hi]
    xmax = max(x for pts in series.values() for x, _ in pts) or 1
    xticks = nice_ticks(0, xmax)
    xmax = xticks[-1]
    small, big = font(13), font(15)
    legend = len(series) > 1 if legend is None else legend
    legend_w = 24 + max(big.getlength(k) for k in [*series, *legend_names]) if legend else 0
    W, H = size
    L, R, TOP, BOT = 78, W - 16 - legend_w, 34, H - 48
    X = lambda x: L + (R - L) * x / xmax
    Y = lambda y: BOT - (BOT - TOP) * ((math.log10(max(y, 1e-30)) if log else y) - lo) / (hi - lo)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.text((L, 8), title, fill="black", font=big)
    for v in yticks:
        y = BOT - (BOT - TOP) * (v - lo) / (hi - lo)
        d.line([(L, y), (R, y)], fill=(225, 225, 225))
        d.text((L - 6, y), f"{10.0 ** v:.3g}" if log else f"{v:g}", fill="black", font=small, anchor="rm")
    for v in xticks:
        d.line([(X(v), BOT), (X(v), BOT + 4)], fill="black")
        d.text((X(v), BOT + 6), f"{v:g}", fill="black", font=small, anchor="ma")
    d.rectangle([L, TOP, R, BOT], outline="black")
    d.text(((L + R) / 2, H - 6), xlabel, fill="black", font=big, anchor="md")
    label = Image.new("RGB", (int(big.getlength(ylabel)) + 4, 20), "white")
    ImageDraw.Draw(label).text((2, 2), ylabel, fill="black", font=big)
    label = label.rotate(90, expand=True)
    im.paste(label, (4, int((TOP + BOT - label.height) / 2)))
    for k, (name, pts) in enumerate(series.items()):
        c = COLORS[k % len(COLORS)]
        pts = [(X(x), Y(y)) for x, y in pts]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for x, y in pts if len(pts) <= 20 else []:  # few points: mark them, so a curve of three is not a guess
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        if legend:
            d.line([(R + 10, TOP + 10 + 20 * k), (R + 28, TOP + 10 + 20 * k)], fill=c, width=3)
            d.text((R + 32, TOP + 10 + 20 * k), name, fill="black", font=big, anchor="lm")
    return im


