// GeoAgent's page: upload a photo, read the agent's server-sent events, draw the answer with GeoAgentMap (geoagent-map.js).
// Every text from the server goes through textContent (place names and model answers are not HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const regionNames = typeof Intl.DisplayNames === "function" ? new Intl.DisplayNames(["en"], { type: "region" }) : null;
const state = { config: null, map: null, mapData: null, names: {}, busy: false };

function countryName(code) {
  if (!code) return "";
  try {
    return (regionNames && regionNames.of(code)) || code;
  } catch (_) {
    return code;
  }
}

// "1 candidate", "3 candidates": a count with its noun agreeing.
const count = (n, noun) => `${n} ${n === 1 ? noun : noun + "s"}`;

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function step(text, className) {
  const item = element("li", text, className);
  $("steps").appendChild(item);
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function label(id) {
  const c = state.names[id];
  return c ? `${c.place || c.id}${c.country ? ", " + c.country : ""}` : id;
}

function remember(candidates) {
  for (const c of candidates) state.names[c.id] = c;
}

function fmt(x, digits) {
  return Number(x).toFixed(digits);
}

// A match (or a set) without a winner is a tie only if some ask was answered; when every ask failed, nothing was decided.
function matchFailed(m) {
  return !m.winner && m.votes.length > 0 && m.votes.every((v) => v === null);
}

// One handler per event name the server sends.
const handlers = {
  candidates(event) {
    remember(event.candidates);
    const top = event.candidates[0];
    step(`Retrieved ${count(event.candidates.length, "candidate")} from the reference photos` + (top ? `; closest: ${label(top.id)}` : ""));
  },
  prior(event) {
    const shown = event.prior.slice(0, 5).map((p) => `${countryName(p.country)} ${Math.round(p.p * 100)}%`);
    step(`Country prior: ${shown.join(", ") || "no country"}`);
  },
  guesses(event) {
    for (const g of event.guesses) {
      const item = step(`Guess ${g.sample}: ${countryName(g.country)} (${fmt(g.lat, 3)}, ${fmt(g.lon, 3)}), confidence ${fmt(g.confidence, 2)}`);
      item.appendChild(element("span", g.clues.join("; "), "clues"));
    }
    if (event.consensus) step(`The guesses agree near (${fmt(event.consensus.lat, 3)}, ${fmt(event.consensus.lon, 3)}): added as a candidate`);
  },
  rerank(event) {
    remember(event.pool);
    if (event.skipped) step(`Reranking ${event.skipped === "off" ? "is off" : "skipped: " + event.skipped}`);
    else step(`Comparing ${count(event.pool.length, "candidate")} (${event.strategy})`);
  },
  match(event) {
    const m = event.match;
    const failed = matchFailed(m);
    const outcome = m.winner ? `${label(m.winner)} wins` : failed ? "no answer (every question about it failed)" : "a tie";
    step(`${label(m.a)} vs ${label(m.b)}: ${outcome}`, failed ? "match failed" : "match");
  },
  set(event) {
    const s = event.set;
    const failed = matchFailed(s);
    const how = s.winner ? "" : failed ? " by evidence (no answer: every question about it failed)" : " by evidence (the answers disagreed)";
    step(`${s.members.map(label).join(", ")}: ${label(s.went_on)} goes on${how}`, failed ? "match failed" : "match");
  },
  score(event) {
    step(`${label(event.score.id)}: ${event.score.score}/10`, "match");
  },
  map(data) {
    state.mapData = data;
  },
  result(result) {
    step("Done.");
    showResult(result);
  },
  error(event) {
    showError(event.error);
  },
};

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

// The answer is drawn by the map module that --map pages use, from the MapData the server sent before the result.
function mapOptions() {
  return { tiles: state.config.tiles, attribution: state.config.attribution, panel: false }; // #explanation says it
}

function showMap(data) {
  if (state.map) state.map.remove();
  state.map = data ? GeoAgentMap.draw($("map"), data, mapOptions()).map : GeoAgentMap.blank($("map"), mapOptions());
}

function showResult(result) {
  showMap(state.mapData);
  const where = [result.place, countryName(result.country)].filter(Boolean).join(", ") || "unknown place";
  const photo = state.mapData ? state.mapData.photos[0] : null;
  showExplanation(result, where, photo && photo.exif);
  showExif(result.exif);
}

function showExplanation(result, where, exif) {
  const sure = result.calibrated
    ? `${Math.round(result.confidence * 100)}% likely within ${fmt(result.confidence_km, 0)} km`
    : `confidence ${fmt(result.confidence, 2)} (uncalibrated score)`;
  const best = result.candidates[0];
  $("summary").textContent = result.abstained
    ? `Unknown: ${sure} is below the minimum confidence. Best guess (not an answer): ${best.place || best.id} (${fmt(best.lat, 4)}, ${fmt(best.lon, 4)})`
    : `${where} (${fmt(result.lat, 4)}, ${fmt(result.lon, 4)}), ${sure}`;
  $("summary").classList.toggle("abstained", Boolean(result.abstained));
  const why = $("why");
  why.replaceChildren();
  if (result.match === "near_duplicate") why.appendChild(element("li", "The photo is a near-duplicate of an indexed reference: that reference is the answer."));
  const stats = result.stats || {};
  for (const [stage, how] of Object.entries(stats.stages || {})) why.appendChild(element("li", `${stage}: ${how}`));
  const top = result.candidates[0];
  const terms = top && result.trace && result.trace.fusion ? result.trace.fusion[top.id] : null;
  if (terms) {
    const parts = Object.entries(terms).map(([name, value]) => `${name} ${fmt(value, 3)}`);
    why.appendChild(element("li", `Top candidate's score: ${parts.join(", ")}`));
  }
  if (exif) why.appendChild(element("li", `The photo's EXIF GPS (${fmt(exif.lat, 4)}, ${fmt(exif.lon, 4)}) is ${fmt(exif.distance_km, 1)} km from this answer`));
  const cost = stats.cost_usd !== undefined && stats.cost_usd !== null ? `, $${fmt(stats.cost_usd, 4)}` : "";
  const cachedTokens = stats.cached_input_tokens ? ` (${stats.cached_input_tokens} cached)` : "";
  const tokens = `${stats.input_tokens || 0} input tokens${cachedTokens}, ${stats.output_tokens || 0} output`;
  why.appendChild(element("li", `${stats.vlm_calls || 0} VLM requests, ${stats.cache_hits || 0} cache hits, ${tokens}${cost}, ${fmt(stats.wall_s || 0, 1)} s`));
  const failed = stats.failed_questions || [];
  if (failed.length) why.appendChild(element("li", `${count(failed.length, "question")} failed; the agent went on without them`));
  $("explanation").hidden = false;
}

// EXIF is optional and its shape may grow: show whatever fields are set, nested objects flattened.
const EXIF_LABELS = {
  "gps lat": "GPS latitude", "gps lon": "GPS longitude", "gps altitude m": "GPS altitude (m)",
  "taken at": "Taken at", make: "Camera make", model: "Camera model", orientation: "Orientation",
};
function flatten(value, prefix, rows) {
  if (value === null || value === undefined) return rows;
  if (typeof value === "object" && !Array.isArray(value)) {
    for (const [key, inner] of Object.entries(value)) flatten(inner, prefix ? `${prefix} ${key}` : key, rows);
  } else {
    const key = prefix.replaceAll("_", " ");
    rows.push([EXIF_LABELS[key] || key, Array.isArray(value) ? value.join(", ") : String(value)]);
  }
  return rows;
}

function showExif(exif) {
  const table = $("exif-table");
  table.replaceChildren();
  const rows = flatten(exif, "", []);
  for (const [key, value] of rows) {
    const row = element("tr");
    row.appendChild(element("td", key));
    row.appendChild(element("td", value));
    table.appendChild(row);
  }
  $("exif").hidden = rows.length === 0;
}

// Server-sent events read from a POST response: blocks separated by a blank line, "event:" and "data:" lines.
async function readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length && handlers[name]) handlers[name](JSON.parse(data.join("\n")));
    }
  }
}

function reset(file) {
  state.names = {};
  $("steps").replaceChildren();
  $("error").hidden = true;
  $("explanation").hidden = true;
  $("exif").hidden = true;
  state.mapData = null;
  showMap(null);
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
}

async function locate(file) {
  if (state.busy || !file) return;
  if (file.size > state.config.max_upload_bytes) {
    showError(`${file.name}: larger than the ${state.config.max_upload_bytes / 1e6} MB upload limit`);
    return;
  }
  state.busy = true;
  reset(file);
  $("status").textContent = `Locating ${file.name}…`;
  step("Uploading the photo");
  const form = new FormData();
  form.append(state.config.field, file);
  try {
    const response = await fetch("/api/locate/stream?explain=true", { method: "POST", body: form });
    if (!response.ok) {
      const body = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
      showError(body.error);
      return;
    }
    await readEvents(response);
  } catch (err) {
    showError(`the server could not be reached (${err.message})`);
  } finally {
    state.busy = false;
    $("status").textContent = "";
  }
}

const SERVERS_POLL_MS = 3000; // how often a ready page asks whether the model servers are up
const BACK_SHOWN_MS = 120000; // how long "back" stays said after a server returns

// "Model server down since …" while any server is out (photos wait for it, then fail), "back" once it returns.
// body[data-servers] carries it: up, down or back.
function showServers(servers) {
  const all = Object.values(servers || {}).flat();
  const down = all.filter((s) => !s.up);
  const back = all.filter((s) => s.up && s.back_since && Date.now() - Date.parse(s.back_since) < BACK_SHOWN_MS);
  const line = $("servers");
  const time = (stamp) => new Date(stamp).toLocaleTimeString();
  if (down.length) {
    line.textContent = down.map((s) => `Model server ${s.url} is down since ${time(s.down_since)}` +
      (s.problem ? ` (${s.problem})` : "") + ": photos wait for it, and it is tried again by itself.").join(" ");
  } else if (back.length) {
    line.textContent = back.map((s) => `Model server ${s.url} is back since ${time(s.back_since)}.`).join(" ");
  }
  line.hidden = !(down.length || back.length);
  document.body.dataset.servers = down.length ? "down" : back.length ? "back" : "up";
}

// The server listens before its models are loaded: say so until /api/status reads "ready" (a photo dropped
// meanwhile waits on the server for them). body[data-models] carries the state: loading, ready or failed.
// Once ready, the model servers' state is watched for as long as the page is open.
async function watchStartup() {
  for (;;) {
    let status;
    try {
      status = await (await fetch("/api/status", { cache: "no-store" })).json();
    } catch (err) {
      status = { state: "failed", message: `the server could not be reached (${err.message})` };
    }
    document.body.dataset.models = status.state;
    if (status.state === "failed") showError(status.message);
    if (!state.busy) $("status").textContent = status.state === "loading" ? "Loading models…" : "";
    if (status.state === "failed") return;
    showServers(status.model_servers);
    await new Promise((resolve) => setTimeout(resolve, status.state === "loading" ? 500 : SERVERS_POLL_MS));
  }
}

async function start() {
  state.config = await (await fetch("/api/config")).json();
  watchStartup();
  showMap(null);
  const drop = $("drop");
  $("photo").addEventListener("change", (e) => {
    locate(e.target.files[0]);
    e.target.value = ""; // choosing the same photo again is a new request
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    locate(e.dataTransfer.files[0]);
  });
  document.body.dataset.ready = "true";
}

start();
