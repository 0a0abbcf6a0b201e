(delta, cursor) => {
  // KV Lab's Profile panel draws its plots in the browser from the server's deltas (panels/live_view.py), so the
  // server never rebuilds a figure and a redraw never resets a user's zoom. What the page does per update is
  // bounded too, however long the run: while it runs, the plots are drawn every DRAW_EVERY_MS, or less often where
  // a draw costs more than 1/DRAW_BUDGET of that (the deltas of the seconds between are kept; the progress line
  // above them moves every second), the run timeline shows its last
  // WINDOW steps (SVG, extendTraces with a point cap), the step-time plot at most STEP_POINTS points; when it ends,
  // the page asks for the whole run (bounded by the server) and draws it once (WebGL), keeping the user's zoom.
  // Returns the cursor of what is drawn ("" asks for the whole run again); a delta made from another cursor is
  // ignored.
  const STEP_POINTS = 300, DRAW_EVERY_MS = 5000, DRAW_BUDGET = 40, DRAW_AT_LEAST_MS = 15000;
  const P = window.Plotly;
  const div = (id) => document.querySelector(`#${id} [data-testid="plotly"]`);
  const divs = {tl: div("kvlab-timeline"), one: div("kvlab-onestep"), st: div("kvlab-steps")};
  const S = (window.__kvlab = window.__kvlab || {cursor: ""});
  let d;
  try { d = typeof delta === "string" ? (delta ? JSON.parse(delta) : null) : delta; } catch (e) { return S.cursor; }
  if (!d || !d.cursor) return cursor || S.cursor;
  if (!P || !divs.tl || !divs.one || !divs.st) return S.cursor;  // the plots are not mounted yet: ask again
  if (!d.reset && d.base !== S.cursor) return S.cursor;
  const WINDOW = d.window || 12;

  const lanes = d.lanes, stepRow = lanes.length;
  const row = (lane) => lanes.length - 1 - lane;  // the first lane on top, under the steps
  const fmt = (v, n = 3) => (v === null || v === undefined ? "—" : Number(v).toFixed(n));
  const base = {margin: {l: 130, r: 20, t: 40, b: 40}, hovermode: "closest", plot_bgcolor: "white",
                paper_bgcolor: "white", showlegend: true, legend: {orientation: "h", y: -0.18}};
  const live = !d.finished;  // while the run goes on, what is drawn is bounded

  if (d.reset) {
    // The user's zoom of the timeline survives the redraw of the whole run at its end (the same run).
    const zoom = S.run === d.run && divs.tl.layout && divs.tl.layout.xaxis && divs.tl.layout.xaxis.autorange === false
      ? {x: divs.tl.layout.xaxis.range.slice()} : null;
    const keepSt = S.run === d.run ? {userZoom: S.userZoom, lastRange: S.lastRange} : {userZoom: false, lastRange: null};
    // A run joined while it goes on is first drawn DRAW_EVERY_MS later, like every later draw: a short run costs
    // its watcher one draw, at its end.
    Object.assign(S, {run: d.run, onGpu: d.on_gpu, warmup: 0, layers: 1, drawnAt: performance.now(), barsNote: "",
                      ...keepSt});
    S.st = {step: [], ms: [], predicted: [], tokens: []};
    S.pending = Array.from({length: lanes.length + 8}, () => ({x: [], y: [], t: []}));
    S.stepsChanged = true;
    const gl = d.finished ? "scattergl" : "scatter";  // a whole run on the GPU's (or software) WebGL; a window as SVG
    const traces = lanes.map(([, label, colour]) => ({type: gl, mode: "lines", name: label, x: [], y: [],
      hovertext: [], hoverinfo: "text", line: {width: 12, color: colour}, showlegend: false}));
    for (const [name, colour] of [["steps (even)", "#b8b8b8"], ["steps (odd)", "#8a8a8a"]]) {
      traces.push({type: gl, mode: "lines", name, x: [], y: [], hovertext: [], hoverinfo: "text",
                   line: {width: 12, color: colour}, showlegend: false});
    }
    const series = [["payload H2D GB/s", "#4c78a8", "solid"], ["payload D2H GB/s", "#b279a2", "solid"],
                    ["link H2D (NVML)", "#4c78a8", "dot"], ["link D2H (NVML)", "#b279a2", "dot"],
                    ["PCIe read (CUPTI)", "#1f3b73", "solid"], ["PCIe write (CUPTI)", "#6b2f66", "solid"]];
    for (const [name, colour, dash] of series) {
      traces.push({type: gl, mode: "lines", name, x: [], y: [], hovertext: [], yaxis: "y2",
                   line: {width: 1.5, color: colour, dash}, connectgaps: false});
    }
    const ticks = [...lanes.map(([, label], i) => [row(i), label]), [stepRow, "decode steps"]];
    const what = d.finished ? "every layer's lanes" : `every layer's lanes, the last ${WINDOW} steps while it runs`;
    // While the run goes on, the new (empty) timeline is made at its first draw, not now: making a plot is a
    // draw, and a short run is then drawn once, at its end.
    S.newTimeline = () => P.newPlot(divs.tl, traces, {...base, height: 430, title: {text: `Run #${d.run}: ${what}`},
      uirevision: `tl-${d.run}`,
      xaxis: {anchor: "y2", title: {text: "ms since the run started"}, gridcolor: "#eee",
              ...(zoom ? {range: zoom.x, autorange: false} : {})},
      yaxis: {domain: [0.36, 1], tickvals: ticks.map((t) => t[0]), ticktext: ticks.map((t) => t[1]),
              range: [-0.6, stepRow + 0.6], zeroline: false, gridcolor: "#eee"},
      yaxis2: {domain: [0, 0.26], title: {text: "PCIe GB/s"}, rangemode: "tozero", gridcolor: "#eee"}},
      {responsive: true, displaylogo: false});
    if (!live) { S.newTimeline(); S.newTimeline = null; }
  }

  // The run timeline: three points per bar (start, end, gap), one trace per lane, kept until the next draw.
  const n = lanes.length, add = S.pending;
  const bars = d.bars;
  for (let i = 0; i < bars.lane.length; i++) {
    const lane = bars.lane[i], a = add[lane], label = lanes[lane][1], dur = bars.x1[i] - bars.x0[i];
    S.layers = Math.max(S.layers, bars.layer[i] + 1);
    const text = bars.n[i] > 1
      ? `${label}: ${bars.n[i]} spans merged${bars.step[i] >= 0 ? `, step ${bars.step[i]}` : ""}<br>${fmt(dur)} ms`
      : `${label}, layer ${bars.layer[i]}, step ${bars.step[i]}<br>${fmt(dur)} ms`;
    a.x.push(bars.x0[i], bars.x1[i], null); a.y.push(row(lane), row(lane), null); a.t.push(text, text, "");
  }
  const steps = d.steps;
  for (let i = 0; i < steps.step.length; i++) {
    const k = steps.step[i], part = add[n + (k % 2)], text = `step ${k}: ${fmt(steps.ms[i])} ms`;
    part.x.push(steps.t0[i], steps.t1[i], null); part.y.push(stepRow, stepRow, null); part.t.push(text, text, "");
    for (const [j, key] of [[2, "h2d"], [3, "d2h"]]) {
      add[n + j].x.push(steps.t0[i], steps.t1[i], null); add[n + j].y.push(steps[key][i], steps[key][i], null);
      add[n + j].t.push("", "", "");
    }
    S.st.step.push(k); S.st.ms.push(steps.ms[i]); S.st.predicted.push(steps.predicted[i]); S.st.tokens.push(steps.tokens[i]);
    S.stepsChanged = true;
  }
  for (const [j, src, keys] of [[4, d.link, ["rx", "tx"]], [6, d.pm && d.pm.pcie, ["read", "write"]]]) {
    if (!src || !src.t.length) continue;
    keys.forEach((key, m) => { add[n + j + m].x.push(...src.t); add[n + j + m].y.push(...src[key]);
                               add[n + j + m].t.push(...src.t.map(() => "")); });
  }
  if (d.warmup !== undefined && d.warmup !== S.warmup) { S.warmup = d.warmup; S.stepsChanged = true; }
  if (d.one_step) S.one = d.one_step;
  if (d.l2_why) S.l2Why = d.l2_why;
  const now = performance.now();
  const picked = d.one_step && !d.following && d.one_step.step !== S.oneDrawn;  // a step the user asked for
  // Drawing is bounded by what it costs here: at most 1/DRAW_BUDGET of the time goes to drawing (the page may share
  // the cores the engine computes on), never more often than every DRAW_EVERY_MS, and at least every
  // DRAW_AT_LEAST_MS (a very slow page still sees its run move).
  const every = Math.min(DRAW_AT_LEAST_MS, Math.max(DRAW_EVERY_MS, DRAW_BUDGET * (S.drawMs || 0)));
  if (live && !picked && now - S.drawnAt < every) return (S.cursor = d.cursor);
  S.drawnAt = now;
  if (S.newTimeline) { S.newTimeline(); S.newTimeline = null; }
  const idx = add.map((a, i) => i).filter((i) => add[i].x.length);
  if (idx.length) {
    const cap = (i) => (i < n ? 3 * WINDOW * S.layers : i < n + 2 ? 3 * Math.ceil(WINDOW / 2) : i < n + 4 ? 3 * WINDOW
                        : 50 * WINDOW);
    const update = {x: idx.map((i) => add[i].x), y: idx.map((i) => add[i].y), hovertext: idx.map((i) => add[i].t)};
    const caps = idx.map(cap);  // per trace and attribute: the structure of the update
    if (live) P.extendTraces(divs.tl, update, idx, {x: caps, y: caps, hovertext: caps});
    else P.extendTraces(divs.tl, update, idx);
    S.pending = Array.from({length: n + 8}, () => ({x: [], y: [], t: []}));
  }
  if (d.bars_note && d.bars_note !== S.barsNote) {
    S.barsNote = d.bars_note;
    P.relayout(divs.tl, {"title.text": `Run #${d.run}: every layer's lanes (${d.bars_note})`});
  }

  // Step time: the axis is set by the steps after the warm-up, which are marked and left off it.
  if (S.stepsChanged) {
    S.stepsChanged = false;
    const st = S.st, w = Math.min(S.warmup, st.step.length), stride = live ? Math.ceil(st.step.length / STEP_POINTS) : 1;
    const pick = (xs, from = 0) => xs.filter((_, i) => i >= from && ((i - from) % stride === 0 || i === xs.length - 1));
    const steady = st.ms.slice(w).concat(st.predicted.slice(w).filter((v) => v !== null));
    const top = steady.length ? 1.15 * Math.max(...steady) : null;
    const tok = st.ms.map((ms, i) => (ms > 0 ? (1000 * st.tokens[i]) / ms : null));
    const traces = [
      {type: "scatter", mode: "lines+markers", name: "measured ms", x: pick(st.step, w), y: pick(st.ms, w),
       marker: {size: 5, color: "#4c78a8"}, line: {color: "#4c78a8"}},
      {type: "scatter", mode: "markers", name: "warm-up / capture steps (off the axis)", x: st.step.slice(0, w),
       y: st.ms.slice(0, w).map((v) => (top !== null ? Math.min(v, top * 0.97) : v)),
       text: st.ms.slice(0, w).map((v) => `warm-up: ${fmt(v, 1)} ms`), hoverinfo: "text",
       marker: {size: 9, symbol: "triangle-up", color: "#999"}},
      {type: "scatter", mode: "lines", name: "tokens/s", x: pick(st.step), y: pick(tok), yaxis: "y2",
       line: {color: "#54a24b", width: 1.5}}];
    if (S.onGpu) {
      traces.splice(1, 0, {type: "scatter", mode: "lines", name: "predicted ms", x: pick(st.step), y: pick(st.predicted),
                           line: {dash: "dash", color: "#f58518"}});
    }
    const range = S.userZoom && S.lastRange ? S.lastRange : top !== null ? [0, top] : null;
    if (!S.userZoom) S.lastRange = range;
    const shapes = w ? [{type: "rect", xref: "x", yref: "paper", x0: 0.5, x1: w + 0.5, y0: 0, y1: 1,
                         fillcolor: "#999", opacity: 0.12, line: {width: 0}}] : [];
    const notes = [];
    if (w) notes.push({text: `warm-up: ${st.ms.slice(0, w).map((v) => fmt(v, 1)).join(", ")} ms`, x: 0.5, xref: "x",
                       xanchor: "left", y: 0.02, yref: "paper", yanchor: "bottom", showarrow: false, font: {size: 10}});
    if (!S.onGpu) notes.push({text: "no predicted line: no GPU (see the summary)", x: 1, xref: "paper", y: 1,
      yref: "paper", xanchor: "right", yanchor: "bottom", showarrow: false, font: {size: 10, color: "#666"}});
    P.react(divs.st, traces, {...base, height: 350, margin: {l: 60, r: 60, t: 40, b: 90}, legend: {orientation: "h", y: -0.32},
      title: {text: `Run #${S.run}: step time and tokens/s`}, uirevision: `st-${S.run}`, shapes, annotations: notes,
      xaxis: {title: {text: "decode step"}, gridcolor: "#eee"},
      yaxis: {title: {text: "ms"}, range: range || undefined, rangemode: "tozero", gridcolor: "#eee"},
      yaxis2: {title: {text: "tokens/s"}, overlaying: "y", side: "right", rangemode: "tozero", showgrid: false}},
      {responsive: true, displaylogo: false});
    if (!divs.st.__kvlabZoom) {
      divs.st.__kvlabZoom = true;
      divs.st.on("plotly_relayout", (ev) => {
        if (ev["yaxis.range[0]"] !== undefined || ev["yaxis.range"]) {
          S.userZoom = true; S.lastRange = ev["yaxis.range"] || [ev["yaxis.range[0]"], ev["yaxis.range[1]"]];
        } else if (ev["yaxis.autorange"]) { S.userZoom = false; }
      });
    }
  }

  // One step: the pipeline per layer, the PCIe series and the L2 % under it, on one time axis.
  if (S.one && (S.one.step !== S.oneDrawn || d.reset || !live)) {
    const one = S.one, sp = one.spans, traces = [];
    S.oneDrawn = one.step;
    lanes.forEach(([, label, colour], lane) => {
      const t = {type: "scatter", mode: "lines", name: label, x: [], y: [], hovertext: [], hoverinfo: "text",
                 line: {width: 16, color: colour}, showlegend: false};
      for (let i = 0; i < sp.lane.length; i++) {
        if (sp.lane[i] !== lane) continue;
        const text = `${label}, layer ${sp.layer[i]}<br>${fmt(sp.x0[i])}–${fmt(sp.x1[i])} ms` +
          (sp.bytes[i] ? `, ${(sp.bytes[i] / 1048576).toFixed(2)} MiB` : "");
        t.x.push(sp.x0[i], sp.x1[i], null); t.y.push(row(lane), row(lane), null); t.hovertext.push(text, text, "");
      }
      traces.push(t);
    });
    if (sp.lane.length && sp.lane.length <= 96) {
      traces.push({type: "scatter", mode: "text", x: sp.x0.map((x0, i) => (x0 + sp.x1[i]) / 2),
                   y: sp.lane.map((lane) => row(lane) + 0.42), text: sp.layer.map((l) => `${l}`),
                   textfont: {size: 9, color: "#444"}, hoverinfo: "skip", showlegend: false});
    }
    const line = (name, s, y, colour, dash = "solid", axis = "y2", shape = "linear") =>
      ({type: "scatter", mode: "lines", name, x: s.t, y, yaxis: axis, line: {width: 1.5, color: colour, dash, shape}});
    for (const [dir, colour] of [["h2d", "#4c78a8"], ["d2h", "#b279a2"]]) {
      const p = one.payload[dir];
      if (p && p.t.length) traces.push(line(`payload ${dir.toUpperCase()} GB/s`, p, p.gb_s, colour, "solid", "y2", "hv"));
    }
    if (one.link) {
      traces.push(line("link H2D (NVML)", one.link, one.link.rx, "#4c78a8", "dot"));
      traces.push(line("link D2H (NVML)", one.link, one.link.tx, "#b279a2", "dot"));
    }
    if (one.pm && one.pm.pcie) {
      traces.push(line("PCIe read (CUPTI)", one.pm.pcie, one.pm.pcie.read, "#1f3b73"));
      traces.push(line("PCIe write (CUPTI)", one.pm.pcie, one.pm.pcie.write, "#6b2f66"));
    }
    traces.push({type: "scatter", mode: "lines", x: [0], y: [null], yaxis: "y3", showlegend: false, hoverinfo: "skip"});
    const notes = [];
    if (one.pm && one.pm.l2) {
      const key = Object.keys(one.pm.l2).find((k) => k !== "t");
      traces.push(line("L2 hit % (CUPTI)", one.pm.l2, one.pm.l2[key], "#e45756", "solid", "y3"));
    } else {
      notes.push({text: `no L2 series: ${S.l2Why || "no L2 samples in this step"}`, x: 0.01, xref: "paper",
                  y: 0.06, yref: "paper", xanchor: "left", showarrow: false, font: {size: 10, color: "#666"}});
    }
    if (!sp.lane.length) notes.push({text: "No per-layer spans in this step: the engine timed the whole step only",
      x: 0.5, xref: "paper", y: 0.75, yref: "paper", showarrow: false, font: {color: "#666"}});
    const ticks = lanes.map(([, label], i) => [row(i), label]);
    const warm = one.step <= S.warmup ? " (a warm-up step)" : "";
    P.react(divs.one, traces, {...base, height: 470, annotations: notes, uirevision: `one-${S.run}`,
      title: {text: `Step ${one.step}${warm}: ${fmt(one.ms)} ms, per layer: copies, recompute, attention, MLP`},
      xaxis: {anchor: "y3", title: {text: `ms since step ${one.step} began`}, gridcolor: "#eee"},
      yaxis: {domain: [0.42, 1], tickvals: ticks.map((t) => t[0]), ticktext: ticks.map((t) => t[1]),
              range: [-0.6, lanes.length - 0.1], zeroline: false, gridcolor: "#eee"},
      yaxis2: {domain: [0.18, 0.36], title: {text: "PCIe GB/s"}, rangemode: "tozero", gridcolor: "#eee"},
      yaxis3: {domain: [0, 0.12], title: {text: "L2 %"}, range: [0, 100], gridcolor: "#eee"}},
      {responsive: true, displaylogo: false});
  }
  if (live) {  // what this draw cost, its frame's layout and paint included (the frame after it has begun)
    requestAnimationFrame(() => setTimeout(() => { S.drawMs = performance.now() - now; }, 0));
  }
  // A run that has ended was drawn bounded while it ran: ask for all of it once (the server bounds that too).
  S.cursor = d.finished && !d.reset ? "" : d.cursor;
  return S.cursor;
}
