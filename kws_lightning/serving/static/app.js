// The live page: microphone -> AudioWorklet (16 kHz PCM16) -> WS /stream -> bars, detections, log-mel.
// Everything it needs is served by the app itself (no CDN, no build step). `window.kws` keeps what the
// server sent so a browser test can compare it with what the page shows.
"use strict";

const state = { health: null, ws: null, context: null, stream: null, stopping: false, bars: {} };
window.kws = { messages: 0, detections: [], errors: [] };
const $ = (id) => document.getElementById(id);

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
  if (isError) window.kws.errors.push(text);
}

function setServer(ok, text) {
  $("server").textContent = text;
  $("server").className = ok ? "ok" : "down";
}

async function checkHealth() {
  try {
    const response = await fetch("/health", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const health = await response.json();
    if (!state.health) {
      state.health = health;
      $("model").textContent = `${health.model} · ${health.keywords.length} keywords · ${health.sample_rate} Hz · v${health.version}`;
      buildBars(health.classes);
    }
    setServer(true, "server ok");
    return true;
  } catch (error) {
    setServer(false, "server unreachable");
    return false;
  }
}

function buildBars(classes) {
  const holder = $("bars");
  holder.textContent = "";
  for (const name of classes) {
    const row = document.createElement("div");
    row.className = "bar";
    row.dataset.label = name;
    row.innerHTML = `<span>${name}</span><div class="track"><div class="fill"></div></div><span class="value">0.00</span>`;
    holder.appendChild(row);
    state.bars[name] = row;
  }
}

function showPosteriors(classes, row) {
  let top = 0;
  row.forEach((p, i) => { if (p > row[top]) top = i; });
  classes.forEach((name, i) => {
    const bar = state.bars[name];
    if (!bar) return;
    bar.querySelector(".fill").style.width = `${(100 * row[i]).toFixed(1)}%`;
    bar.querySelector(".value").textContent = row[i].toFixed(2);
    bar.classList.toggle("top", i === top);
  });
}

function addDetection(d) {
  window.kws.detections.push(d);
  const none = $("none");
  if (none) none.remove();
  const item = document.createElement("li");
  item.className = "detection";
  item.dataset.keyword = d.keyword;
  item.dataset.time = d.time_s;
  item.innerHTML = `<span class="keyword">${d.keyword}</span><span>${d.time_s.toFixed(2)} s · ${d.score.toFixed(2)}</span>`;
  $("detections").prepend(item);
  while ($("detections").children.length > 30) $("detections").lastChild.remove();
}

// Scroll the picture left by the new frames and paint them as columns (low bands at the bottom).
function drawMel(frames) {
  const canvas = $("mel");
  const g = canvas.getContext("2d");
  const n = frames.length;
  if (!n) return;
  g.drawImage(canvas, -n, 0);
  const image = g.createImageData(n, canvas.height);
  frames.forEach((frame, x) => {
    frame.forEach((db, band) => {
      const v = Math.max(0, Math.min(1, (db + 90) / 100));
      const y = canvas.height - 1 - band;
      const at = 4 * (y * n + x);
      image.data[at] = Math.round(255 * Math.min(1, 1.6 * v * v));
      image.data[at + 1] = Math.round(255 * Math.max(0, v - 0.35) * 1.4);
      image.data[at + 2] = Math.round(255 * (0.3 + 0.5 * v) * (1 - v));
      image.data[at + 3] = 255;
    });
  });
  g.putImageData(image, canvas.width - n, 0);
}

function onMessage(event) {
  const message = JSON.parse(event.data);
  window.kws.messages += 1;
  if (message.type === "error") { say(`server: ${message.detail}`, true); return; }
  if (message.type !== "hops") return;
  const rows = message.posteriors;
  if (rows.length) showPosteriors(state.health.classes, rows[rows.length - 1]);
  for (const d of message.detections) addDetection(d);
  if (message.mel) drawMel(message.mel);
}

function micError(error) {
  if (error.name === "NotAllowedError" || error.name === "SecurityError")
    return "Microphone access was denied. Allow it for this site (the lock icon in the address bar) and press Start again.";
  if (error.name === "NotFoundError") return "No microphone was found: plug one in and press Start again.";
  if (error.name === "NotReadableError") return "The microphone is busy or unavailable (another program may hold it).";
  return `Cannot open the microphone: ${error.message || error.name}`;
}

async function start() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    say("This page cannot reach a microphone: open it as http://127.0.0.1:PORT or over https (browsers allow the microphone only in a secure context).", true);
    return;
  }
  if (!(await checkHealth())) {
    say("The server is not reachable: start it with python -m kws_lightning.serve ckpt_path=... and reload.", true);
    return;
  }
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (error) {
    say(micError(error), true);
    return;
  }
  const context = new AudioContext();
  state.context = context;
  await context.audioWorklet.addModule("/static/pcm-worklet.js");
  const rate = state.health.sample_rate;
  const node = new AudioWorkletNode(context, "pcm-resampler", {
    processorOptions: { targetRate: rate, chunkSamples: Math.round(rate / 10) },
  });
  const silent = context.createGain(); // keeps the graph pulled without playing the microphone back
  silent.gain.value = 0;
  context.createMediaStreamSource(state.stream).connect(node).connect(silent).connect(context.destination);

  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/stream?mel=1`);
  state.ws = ws;
  state.stopping = false;
  ws.onmessage = onMessage;
  ws.onopen = () => say(`Listening (${context.sampleRate} Hz microphone, sent at ${rate} Hz). Say a keyword.`);
  ws.onclose = () => {
    if (!state.stopping) {
      say("The connection to the server was lost: is python -m kws_lightning.serve still running? Press Start to reconnect.", true);
      setServer(false, "server gone");
      stop(true);
    }
  };
  node.port.onmessage = (event) => { if (ws.readyState === WebSocket.OPEN) ws.send(event.data); };
  $("start").textContent = "Stop";
  $("start").classList.add("stop");
}

function stop(keepMessage = false) {
  state.stopping = true;
  if (state.ws) state.ws.close();
  if (state.context) state.context.close();
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  state.ws = state.context = state.stream = null;
  $("start").textContent = "Start microphone";
  $("start").classList.remove("stop");
  if (!keepMessage) say("Stopped.");
}

async function scoreFile(file) {
  $("result").textContent = `scoring ${file.name}...`;
  let response;
  try {
    // The server takes audio/* or octet-stream (a dropped file typed text/plain would be refused).
    const type = file.type.startsWith("audio/") ? file.type : "application/octet-stream";
    response = await fetch("/predict", { method: "POST", body: file, headers: { "Content-Type": type } });
  } catch (error) {
    $("result").textContent = "The server is not reachable: is python -m kws_lightning.serve running?";
    setServer(false, "server unreachable");
    return;
  }
  const body = await response.json();
  if (!response.ok) { $("result").textContent = `${file.name}: ${body.detail}`; return; }
  const lines = [`${file.name}: ${body.label} (${body.score.toFixed(3)}), ${body.duration_s.toFixed(2)} s`];
  for (const k of body.top_k) lines.push(`  ${k.label.padEnd(8)} ${k.score.toFixed(3)}`);
  if (body.detections) {
    lines.push(`detections over ${body.scored_s.toFixed(1)} s:`);
    for (const d of body.detections) lines.push(`  ${d.time_s.toFixed(2)} s  ${d.keyword} ${d.score.toFixed(2)}`);
    if (!body.detections.length) lines.push("  none");
  }
  $("result").textContent = lines.join("\n");
}

$("start").onclick = () => (state.ws ? stop() : start());
$("file").onchange = (event) => { if (event.target.files[0]) scoreFile(event.target.files[0]); };
const drop = $("drop");
drop.ondragover = (event) => { event.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files[0]) scoreFile(event.dataTransfer.files[0]);
};
checkHealth();
setInterval(checkHealth, 5000);
