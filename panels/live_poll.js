async (step) => {
  // The Profile panel's timer, run in the page: while a run goes on it asks the server for what is new once a second
  // with one plain POST to the unqueued /profile_live endpoint (the page's own Gradio session, so its own run), draws
  // it (APPLY, panels/live_plots.js) and writes the progress line into an element no Gradio event ever updates.
  // Nothing else moves on the page between draws: a Gradio event per second cost a 2-core machine's engine
  // several percent of its speed (each one re-renders its outputs); this costs a fetch and a text node. When the
  // whole run is drawn it presses the panel's hidden Finish button: the summary, the sources and the timer's end
  // go through the server once.
  const S = (window.__kvlab = window.__kvlab || {cursor: ""});
  if (S.polling || !S.session) return [];
  S.apply = S.apply || (__APPLY__);
  S.polling = true;
  try {
    const root = (window.gradio_config && window.gradio_config.root) || "";
    const url = root ? `${root.replace(/\/$/, "")}/gradio_api/run/profile_live` : "gradio_api/run/profile_live";
    const answer = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({data: [S.cursor, Number(step) || 0, __WINDOW__], session_hash: S.session})});
    if (!answer.ok) return [];
    const d = (await answer.json()).data[0];
    if (!d || !d.cursor) return [];
    const line = document.querySelector("#kvlab-live-line .kvlab-line");
    if (line) line.textContent = d.finished ? "" : (d.progress || "");  // before drawing: a draw may fail
    S.cursor = S.apply(d, S.cursor);
    if (d.finished && d.reset && S.cursor === d.cursor) {  // all of it drawn: the server writes its end
      const finish = document.querySelector("#kvlab-finish");
      if (finish) finish.click();
    }
  } catch (e) {
    // A failed poll is retried at the next tick (a server restarting, a network blip); the error is kept for a look.
    S.lastError = String(e && e.stack || e);
  } finally {
    S.polling = false;
  }
  return [];
}
