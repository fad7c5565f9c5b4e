// The kiosk page: the annotated live video (MJPEG), one card per person with the streaming answer (server-sent
// events from /v1/live/events), the standing question (PUT /v1/live/question), follow-ups (POST
// /v1/live/tracks/{id}/ask) and the browser-camera mode (getUserMedia -> canvas -> JPEG -> POST /v1/live/frames,
// one frame in flight at a time). Talks only to the server that served it.
//
// URL parameters: api_key=KEY (the server's --api-key: sent as a Bearer header, and as ?api_key= where a browser
// cannot set headers: the event stream and the video), fps=N (browser-camera frames per second, default 5).
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const apiKey = params.get("api_key");
  const cameraFps = Math.min(15, Math.max(1, Number(params.get("fps")) || 5));
  const GONE_MS = 4000; // a lost person's card fades, then leaves

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), standing: $("standing"), camera: $("camera"), video: $("video"), novideo: $("novideo"),
    local: $("local"), people: $("people"), empty: $("empty"), form: $("ask"), question: $("question"),
    template: $("card-template"),
  };

  const cards = new Map(); // track id -> {el, question, text, done}
  const lost = new Set(); // ids that left: a late answer does not bring their card back
  let live = { running: false, tracks: 0, camera: false };

  // -- talking to the server ---------------------------------------------------------------------------------
  const url = (path) => (apiKey ? `${path}?api_key=${encodeURIComponent(apiKey)}` : path);
  const headers = (extra = {}) => (apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra);

  async function send(method, path, body) {
    const response = await fetch(path, {
      method, headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
    });
    if (!response.ok) {
      let message = `${response.status}`;
      try { message = (await response.json()).error.message; } catch (_) { /* not our JSON */ }
      throw new Error(message);
    }
    return response.json();
  }

  function showStatus(text, down = false) {
    ui.status.textContent = text;
    ui.status.classList.toggle("down", down);
  }

  function refreshStatus() {
    const who = live.tracks === 1 ? "1 person" : `${live.tracks} people`;
    showStatus(live.running ? `live · ${who}` : "the live source has ended", !live.running);
  }

  // -- cards ----------------------------------------------------------------------------------------------------
  function card(id) {
    let c = cards.get(id);
    if (c) return c;
    const el = ui.template.content.firstElementChild.cloneNode(true);
    el.dataset.track = String(id);
    el.querySelector(".who").textContent = `Person ${id}`;
    el.querySelector(".again").addEventListener("click", () => askTrack(id));
    c = { el, question: null, text: "", done: false, timer: null };
    cards.set(id, c);
    ui.people.append(el);
    ui.empty.hidden = true;
    render(c);
    return c;
  }

  function render(c) {
    c.el.querySelector(".q").textContent = c.question || "";
    c.el.querySelector(".a").textContent = c.text; // "…" while waiting, "(no answer)" for an empty one: CSS
    c.el.classList.toggle("pending", !c.done);
  }

  function update(id, question, text, done, append) {
    if (lost.has(id)) return;
    const c = card(id);
    if (append && (c.done || c.question !== question)) c.text = ""; // a new answer starts
    c.question = question;
    c.text = append ? c.text + text : text;
    c.done = done;
    render(c);
  }

  function remove(id) {
    lost.add(id);
    const c = cards.get(id);
    if (!c) return;
    c.el.classList.add("gone");
    c.el.classList.remove("pending");
    c.timer = setTimeout(() => {
      c.el.remove();
      cards.delete(id);
      ui.empty.hidden = cards.size > 0;
    }, GONE_MS);
  }

  function clearCards() {
    for (const c of cards.values()) { clearTimeout(c.timer); c.el.remove(); }
    cards.clear();
    ui.empty.hidden = false;
  }

  function setStanding(question) {
    ui.standing.textContent = question;
    if (document.activeElement !== ui.question) ui.question.value = question;
  }

  // -- events -----------------------------------------------------------------------------------------------------
  function connect() {
    const events = new EventSource(url("v1/live/events"));
    const on = (kind, fn) => events.addEventListener(kind, (e) => fn(JSON.parse(e.data)));
    on("snapshot", (s) => {
      clearCards();
      lost.clear();
      for (const t of s.tracks) {
        const c = card(t.track_id);
        Object.assign(c, { question: t.question, text: t.text, done: t.done });
        render(c);
      }
      setStanding(s.question);
      live.running = s.running;
      live.tracks = s.tracks.length;
      refreshStatus();
    });
    on("track_appeared", (e) => { lost.delete(e.track_id); card(e.track_id); });
    on("track_lost", (e) => remove(e.track_id));
    on("token", (e) => update(e.track_id, e.question, e.text, false, true));
    on("answer", (e) => update(e.track_id, e.question, e.answer, true, false));
    on("question", (e) => setStanding(e.question));
    on("tracks", (e) => { live.tracks = e.tracks.length; refreshStatus(); });
    on("status", (e) => { live.running = e.running; refreshStatus(); });
    events.onopen = () => refreshStatus();
    events.onerror = () => showStatus("reconnecting…", true); // EventSource retries by itself
  }

  function startVideo() {
    ui.video.onload = () => { ui.video.hidden = false; ui.novideo.hidden = true; };
    ui.video.onerror = () => { // the stream ended (server restart): try again shortly
      ui.video.hidden = true;
      ui.novideo.hidden = false;
      setTimeout(() => { ui.video.src = url("v1/live/video.mjpg") + `${apiKey ? "&" : "?"}t=${Date.now()}`; }, 2000);
    };
    ui.video.src = url("v1/live/video.mjpg");
  }

  // -- questions ------------------------------------------------------------------------------------------------
  ui.form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const question = ui.question.value.trim();
    if (!question) return;
    try {
      setStanding((await send("PUT", "v1/live/question", { question })).question);
      ui.question.blur();
    } catch (err) {
      showStatus(`question not set: ${err.message}`, true);
    }
  });

  async function askTrack(id) {
    const question = ui.question.value.trim() || ui.standing.textContent;
    try {
      await send("POST", `v1/live/tracks/${id}/ask`, { question });
      update(id, question, "", false, false);
    } catch (err) {
      showStatus(`person ${id}: ${err.message}`, true);
    }
  }

  // -- the browser's own camera -------------------------------------------------------------------------------------
  let cameraStream = null;

  async function startCamera() {
    try {
      cameraStream = await navigator.mediaDevices.getUserMedia({
        video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false,
      });
    } catch (err) {
      showStatus(`camera unavailable: ${err.message}`, true);
      return;
    }
    ui.local.srcObject = cameraStream;
    await ui.local.play();
    ui.camera.setAttribute("aria-pressed", "true");
    ui.camera.textContent = "Stop the camera";
    sendFrames(cameraStream);
  }

  function stopCamera() {
    if (cameraStream) cameraStream.getTracks().forEach((t) => t.stop());
    cameraStream = null;
    ui.local.srcObject = null;
    ui.camera.setAttribute("aria-pressed", "false");
    ui.camera.textContent = "Use this screen's camera";
  }

  async function sendFrames(stream) {
    const canvas = document.createElement("canvas");
    const context = canvas.getContext("2d");
    const interval = 1000 / cameraFps;
    while (cameraStream === stream) {
      const started = performance.now();
      if (ui.local.videoWidth > 0) {
        canvas.width = ui.local.videoWidth;
        canvas.height = ui.local.videoHeight;
        context.drawImage(ui.local, 0, 0);
        const jpeg = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.8));
        try {
          const response = await fetch("v1/live/frames", {
            method: "POST", headers: headers({ "Content-Type": "image/jpeg" }), body: jpeg,
          });
          if (response.status === 409) { stopCamera(); ui.camera.hidden = true; break; }
        } catch (_) {
          showStatus("cannot reach the server", true);
        }
      }
      await new Promise((r) => setTimeout(r, Math.max(0, interval - (performance.now() - started))));
    }
  }

  ui.camera.addEventListener("click", () => (cameraStream ? stopCamera() : startCamera()));

  // -- start (after the page has loaded: the endless video must not hold the load event) --------------------------
  window.addEventListener("load", async () => {
    let s;
    try {
      const response = await fetch("v1/live/status", { headers: headers() });
      if (!response.ok) {
        throw new Error(response.status === 404 ? "start the server with --source" : `${response.status}`);
      }
      s = await response.json();
    } catch (err) {
      showStatus(`no live source: ${err.message}`, true);
      ui.novideo.textContent = "No live video on this server.";
      return;
    }
    live.running = s.running;
    live.camera = s.browser_camera;
    ui.camera.hidden = !s.browser_camera;
    connect();
    startVideo();
    if (s.browser_camera && navigator.mediaDevices && params.get("camera") !== "off") startCamera();
  });
})();
