(delta, cursor) => {
  // KV Lab's Profile panel draws its plots in the browser from the server's deltas (panels/live_view.py): the
  // run timeline grows with Plotly.extendTraces, the step-time and one-step plots are redrawn here with
  // Plotly.react under a fixed uirevision, so the server never rebuilds a figure and a user's zoom is kept.
  // Returns the cursor of what is drawn; a delta made from another cursor is ignored (it is asked for again).
  const P = window.Plotly;
  const div = (id) => document.querySelector(`#${id} [data-testid="plotly"]`);
  const divs = {tl: div("kvlab-timeline"), one: div("kvlab-onestep"), st: div("kvlab-steps")};
  const S = (window.__kvlab = window.__kvlab || {cursor: ""});
  let d;
  try { d = typeof delta === "string" ? (delta ? JSON.parse(delta) : null) : delta; } catch (e) { return S.cursor; }
  if (!d || !d.cursor) return cursor || S.cursor;
  if (!P || !divs.tl || !divs.one || !divs.st) return S.cursor;  // the plots are not mounted yet: ask again
  if (!d.reset && d.base !== S.cursor) return S.cursor;

  const lanes = d.lanes;
  const stepRow = lanes.length;
  const row = (lane) => lanes.length - 1 - lane;  // the first lane on top, under the steps
  const fmt = (v, n = 3) => (v === null || v === undefined ? "—" : Number(v).toFixed(n));
  const base = {margin: {l: 130, r: 20, t: 40, b: 40}, hovermode: "closest", plot_bgcolor: "white",
                paper_bgcolor: "white", showlegend: true, legend: {orientation: "h", y: -0.18}};

  if (d.reset) {
    S.run = d.run; S.onGpu = d.on_gpu; S.warmup = 0; S.userZoom = false; S.lastRange = null;
    S.st = {step: [], ms: [], predicted: [], tokens: []};
    const traces = lanes.map(([, label, colour]) => ({type: "scattergl", mode: "lines", name: label, x: [], y: [],
      hovertext: [], hoverinfo: "text", line: {width: 12, color: colour}, showlegend: false}));
    for (const [name, colour] of [["steps (even)", "#b8b8b8"], ["steps (odd)", "#8a8a8a"]]) {
      traces.push({type: "scattergl", mode: "lines", name, x: [], y: [], hovertext: [], hoverinfo: "text",
                   line: {width: 12, color: colour}, showlegend: false});
    }
    const series = [["payload H2D GB/s", "#4c78a8", "solid"], ["payload D2H GB/s", "#b279a2", "solid"],
                    ["link H2D (NVML)", "#4c78a8", "dot"], ["link D2H (NVML)", "#b279a2", "dot"],
                    ["PCIe read (CUPTI)", "#1f3b73", "solid"], ["PCIe write (CUPTI)", "#6b2f66", "solid"]];
    for (const [name, colour, dash] of series) {
      traces.push({type: "scattergl", mode: "lines", name, x: [], y: [], yaxis: "y2",
                   line: {width: 1.5, color: colour, dash}, connectgaps: false});
    }
    const ticks = [...lanes.map(([, label], i) => [row(i), label]), [stepRow, "decode steps"]];
    P.newPlot(divs.tl, traces, {...base, height: 430, title: {text: `Run #${d.run}: every layer's lanes`},
      uirevision: `tl-${d.run}`,
      xaxis: {anchor: "y2", title: {text: "ms since the run started"}, gridcolor: "#eee"},
      yaxis: {domain: [0.36, 1], tickvals: ticks.map((t) => t[0]), ticktext: ticks.map((t) => t[1]),
              range: [-0.6, stepRow + 0.6], zeroline: false, gridcolor: "#eee"},
      yaxis2: {domain: [0, 0.26], title: {text: "PCIe GB/s"}, rangemode: "tozero", gridcolor: "#eee"}},
      {responsive: true, displaylogo: false});
  }

  // Timeline bars: three points per bar (start, end, gap), one trace per lane.
  const bars = d.bars;
  if (bars && bars.lane.length) {
    const add = lanes.map(() => ({x: [], y: [], t: []}));
    for (let i = 0; i < bars.lane.length; i++) {
      const lane = bars.lane[i], a = add[lane], label = lanes[lane][1];
      const dur = bars.x1[i] - bars.x0[i];
      const text = bars.n[i] > 1 ? `${label}: ${bars.n[i]} spans merged${bars.step[i] >= 0 ? `, step ${bars.step[i]}` : ""}<br>${fmt(dur)} ms`
        : `${label}, layer ${bars.layer[i]}, step ${bars.step[i]}<br>${fmt(dur)} ms`;
      a.x.push(bars.x0[i], bars.x1[i], null); a.y.push(row(lane), row(lane), null); a.t.push(text, text, "");
    }
    const idx = [], xs = [], ys = [], ts = [];
    add.forEach((a, i) => { if (a.x.length) { idx.push(i); xs.push(a.x); ys.push(a.y); ts.push(a.t); } });
    P.extendTraces(divs.tl, {x: xs, y: ys, hovertext: ts}, idx);
  }
  const steps = d.steps;
  if (steps && steps.step.length) {
    const even = {x: [], y: [], t: []}, odd = {x: [], y: [], t: []}, h2d = {x: [], y: []}, d2h = {x: [], y: []};
    for (let i = 0; i < steps.step.length; i++) {
      const k = steps.step[i], part = k % 2 ? odd : even, text = `step ${k}: ${fmt(steps.ms[i])} ms`;
      part.x.push(steps.t0[i], steps.t1[i], null); part.y.push(stepRow, stepRow, null); part.t.push(text, text, "");
      h2d.x.push(steps.t0[i], steps.t1[i], null); h2d.y.push(steps.h2d[i], steps.h2d[i], null);
      d2h.x.push(steps.t0[i], steps.t1[i], null); d2h.y.push(steps.d2h[i], steps.d2h[i], null);
      S.st.step.push(k); S.st.ms.push(steps.ms[i]); S.st.predicted.push(steps.predicted[i]);
      S.st.tokens.push(steps.tokens[i]);
    }
    P.extendTraces(divs.tl, {x: [even.x, odd.x], y: [even.y, odd.y], hovertext: [even.t, odd.t]}, [lanes.length, lanes.length + 1]);
    P.extendTraces(divs.tl, {x: [h2d.x, d2h.x], y: [h2d.y, d2h.y]}, [lanes.length + 2, lanes.length + 3]);
  }
  if (d.link && d.link.t.length) {
    P.extendTraces(divs.tl, {x: [d.link.t, d.link.t], y: [d.link.rx, d.link.tx]}, [lanes.length + 4, lanes.length + 5]);
  }
  if (d.pm && d.pm.pcie) {
    P.extendTraces(divs.tl, {x: [d.pm.pcie.t, d.pm.pcie.t], y: [d.pm.pcie.read, d.pm.pcie.write]},
                   [lanes.length + 6, lanes.length + 7]);
  }
  if (d.warmup !== undefined) S.warmup = d.warmup;
  if (d.bars_note) P.relayout(divs.tl, {"title.text": `Run #${d.run}: every layer's lanes (${d.bars_note})`});

  // Step time: the axis is set by the steps after the warm-up, which are marked and left off it.
  if (d.reset || (steps && steps.step.length) || d.warmup !== undefined) {
    const st = S.st, w = Math.min(S.warmup, st.step.length);
    const steady = st.ms.slice(w).concat(st.predicted.slice(w).filter((v) => v !== null));
    const top = steady.length ? 1.15 * Math.max(...steady) : null;
    const tok = st.ms.map((ms, i) => (ms > 0 ? (1000 * st.tokens[i]) / ms : null));
    const traces = [
      {type: "scatter", mode: "lines+markers", name: "measured ms", x: st.step.slice(w), y: st.ms.slice(w),
       marker: {size: 5, color: "#4c78a8"}, line: {color: "#4c78a8"}},
      {type: "scatter", mode: "markers", name: "warm-up / capture steps (off the axis)", x: st.step.slice(0, w),
       y: st.ms.slice(0, w).map((v) => (top !== null ? Math.min(v, top * 0.97) : v)),
       text: st.ms.slice(0, w).map((v) => `warm-up: ${fmt(v, 1)} ms`), hoverinfo: "text",
       marker: {size: 9, symbol: "triangle-up", color: "#999"}},
      {type: "scatter", mode: "lines", name: "tokens/s", x: st.step, y: tok, yaxis: "y2",
       line: {color: "#54a24b", width: 1.5}}];
    if (S.onGpu) {
      traces.splice(1, 0, {type: "scatter", mode: "lines", name: "predicted ms", x: st.step, y: st.predicted,
                           line: {dash: "dash", color: "#f58518"}});
    }
    const range = S.userZoom && S.lastRange ? S.lastRange : top !== null ? [0, top] : null;
    if (!S.userZoom) S.lastRange = range;
    const shapes = w ? [{type: "rect", xref: "x", yref: "paper", x0: 0.5, x1: w + 0.5, y0: 0, y1: 1,
                         fillcolor: "#999", opacity: 0.12, line: {width: 0}}] : [];
    const notes = [];
    if (w) notes.push({text: `warm-up: ${st.ms.slice(0, w).map((v) => fmt(v, 1)).join(", ")} ms`, x: 0.5, xref: "x",
                       xanchor: "left", y: 1, yref: "paper", yanchor: "top", showarrow: false, font: {size: 10}});
    if (!S.onGpu) notes.push({text: "no predicted line: no GPU (see the summary)", x: 1, xref: "paper", y: 1,
      yref: "paper", xanchor: "right", yanchor: "bottom", showarrow: false, font: {size: 10, color: "#666"}});
    P.react(divs.st, traces, {...base, height: 330, margin: {l: 60, r: 60, t: 40, b: 80},
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
  const one = d.one_step;
  if (one) {
    const sp = one.spans, traces = [];
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
      notes.push({text: `no L2 series: ${d.l2_why || S.l2Why || "no L2 samples in this step"}`, x: 0.01, xref: "paper",
                  y: 0.06, yref: "paper", xanchor: "left", showarrow: false, font: {size: 10, color: "#666"}});
    }
    if (!sp.lane.length) notes.push({text: "No per-layer spans in this step: the engine timed the whole step only",
      x: 0.5, xref: "paper", y: 0.75, yref: "paper", showarrow: false, font: {color: "#666"}});
    if (d.l2_why) S.l2Why = d.l2_why;
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
  S.cursor = d.cursor;
  return d.cursor;
}
