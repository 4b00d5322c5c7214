// The chat page: submit a job, follow its events with the job's own token
// (EventSource cannot send headers), show the place in line counting down,
// then the answer as it is written. Every refusal is shown as the sentence
// sluice sends, never as a status code.
//
// While a message waits, the waiting view (#turn) is the page: the place
// in line and a countdown in large type, how far the line has moved since
// the message joined it, what happens next in words, and the user's quota
// for the hour. Screen readers get one polite live region (#status) that
// speaks only meaningful changes: a new phase at once, a new place at most
// every PLACE_EVERY ms (the countdown's ticks never).
//
// The conversation lives in this tab's sessionStorage: each tab is its own
// conversation, a reload keeps it, and a reply still being written when the
// page reloads is followed again from its first event.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.hash.slice(1));

// How often a change of place may be spoken; becoming next, sooner.
const PLACE_EVERY = 10000;
const NEXT_EVERY = 3000;

// api resolves a path against the page's origin, which never holds the
// credentials of a URL like http://user:pass@host/: browsers refuse to
// fetch a URL with credentials in it.
function api(path) { return new URL(path, location.origin).href; }
for (const k of ["key", "user", "model"]) if (params.get(k)) $(k).value = params.get(k);
if ($("key").value) $("settings").open = false;

const store = {
  get(k, d) { try { return JSON.parse(sessionStorage.getItem("sluice." + k)) ?? d; } catch (e) { return d; } },
  set(k, v) { try { sessionStorage.setItem("sluice." + k, JSON.stringify(v)); } catch (e) { /* private mode */ } },
};
const fmt = new Intl.NumberFormat();

// turns: what the model sees next time, [{role, content}]; pending: the job
// being answered, {id, token, text}.
let turns = store.get("turns", []);
// current: the job being followed: {id, source, timer, phase, position,
// start (the first place seen), eta (seconds, null: unknown), retryIn,
// attempt, spokenPlace, spokenAt, placeTimer, centred}.
let current = null;

// ---- the live region ----

// say speaks text through the polite live region (and keeps it there for
// a screen reader that reads the region later).
function say(text) {
  if (current) clearTimeout(current.placeTimer);
  if ($("status").textContent !== text) $("status").textContent = text;
}

// sayPlace speaks the place in line when it changed, at most every
// PLACE_EVERY ms (NEXT_EVERY when it became next); a change that comes
// sooner is spoken when the time is up, if it still holds.
function sayPlace() {
  const c = current;
  if (!c || c.phase !== "queued" || c.position === c.spokenPlace) return;
  const wait = c.spokenAt + (c.position === 1 ? NEXT_EVERY : PLACE_EVERY) - Date.now();
  if (wait > 0) {
    clearTimeout(c.placeTimer);
    c.placeTimer = setTimeout(sayPlace, wait);
    return;
  }
  say(placeSentence(c));
  c.spokenPlace = c.position;
  c.spokenAt = Date.now();
}

// ---- words ----

function spokenWait(s) {
  if (s == null) return "";
  if (s <= 0) return "starting any moment";
  if (s < 90) return "about " + s + " seconds";
  if (s < 5400) return "about " + Math.round(s / 60) + " minutes";
  return "about " + Math.round(s / 360) / 10 + " hours";
}

function placeSentence(c) {
  if (c.eta == null) return "You're #" + c.position + " in line. Claude can't be reached just now; your place is kept.";
  const where = c.position === 1 ? "You're next in line" : "You're #" + c.position + " in line";
  return where + ", " + spokenWait(c.eta) + ".";
}

// clock shows a countdown as m:ss (h:mm:ss past an hour).
function clock(s) {
  const pad = (n) => String(n).padStart(2, "0");
  if (s >= 3600) return Math.floor(s / 3600) + ":" + pad(Math.floor((s % 3600) / 60)) + ":" + pad(s % 60);
  return Math.floor(s / 60) + ":" + pad(s % 60);
}

const retryWhy = {
  overloaded: "Claude is overloaded",
  rate_limited: "The account reached its rate limit",
  connection_error: "The connection to Claude failed",
  timeout: "Claude took too long to answer",
  upstream_error: "Claude had an error",
  stream_interrupted: "The answer was cut off",
  worker_stopped: "A sluice server restarted",
  worker_lost: "A sluice server stopped",
};

function phaseText(c) {
  switch (c.phase) {
    case "sending": return "Sending your message…";
    case "connecting": return "Reconnecting…";
    case "queued":
      if (c.eta == null) return "Claude can't be reached just now.";
      if (c.position === 1) return "You're next!";
      return "Waiting for your turn.";
    case "writing": return c.attempt > 1 ? "Claude is writing… (attempt " + c.attempt + ")" : "Claude is writing…";
    case "retrying": return (retryWhy[c.reason] || "Something went wrong") + ". Trying again" +
      (c.retryIn > 0 ? " in " + c.retryIn + " s…" : "…");
    case "canceling": return "Canceling…";
    case "offline": return "Connection lost; reconnecting…";
  }
  return "";
}

// phaseHint is the smaller line under the phase: what happens next.
function phaseHint(c) {
  switch (c.phase) {
    case "queued":
      if (c.eta == null) return "Your place is kept and sluice keeps trying: no need to send again.";
      if (c.position === 1) return "Claude starts on your message as soon as there is room.";
      return "Your place is kept, even if you reload this page.";
    case "writing": return "The answer appears above as it is written.";
    case "retrying": return "The answer will be written again from the start.";
    case "offline": return "Your place is kept; nothing is lost.";
  }
  return "";
}

// ---- the waiting view ----

function render() {
  const c = current;
  const phase = c ? c.phase : "idle";
  $("turn").dataset.phase = phase;
  const waiting = !!c && (phase === "queued" || ((phase === "offline" || phase === "canceling") && c.position > 0));
  $("wait").hidden = !waiting;
  $("steps").hidden = !c;
  $("phase").hidden = !c;
  $("cancel").hidden = !c || !c.id;
  if (!c) {
    $("phase-hint").hidden = true;
    return;
  }
  $("phase").textContent = phaseText(c);
  const hint = phaseHint(c);
  $("phase-hint").textContent = hint;
  $("phase-hint").hidden = !hint;
  const step = phase === "writing" || phase === "retrying" ? "writing" : "line";
  for (const li of $("steps").children) {
    if (li.dataset.step === step) li.setAttribute("aria-current", "step");
    else li.removeAttribute("aria-current");
  }
  if (!waiting) return;
  $("place").textContent = "#" + c.position;
  $("place-label").textContent = c.position === 1 ? "You're next" : "Your place in line";
  renderCountdown();
  const ahead = Math.max(0, c.start - 1), gone = Math.max(0, c.start - c.position);
  $("progress-fill").style.width = (ahead === 0 ? 100 : Math.round((gone / ahead) * 100)) + "%";
  $("progress-text").textContent = ahead === 0 ? "No one is ahead of you."
    : gone + " of the " + ahead + (ahead === 1 ? " message" : " messages") + " ahead of yours " + (gone === 1 ? "has" : "have") + " gone to Claude.";
  if (!c.centred) {
    c.centred = true;
    $("wait").scrollIntoView({ block: "center" });
  }
}

function renderCountdown() {
  const c = current;
  const n = $("countdown");
  n.classList.toggle("words", c.eta == null || c.eta <= 0);
  if (c.eta == null) {
    n.textContent = "–";
    $("eta-label").textContent = "Wait unknown";
  } else {
    n.textContent = c.eta <= 0 ? "Any moment" : clock(c.eta);
    $("eta-label").textContent = "Estimated wait";
  }
}

// tick runs every second: the countdowns move; nothing is spoken.
function tick() {
  const c = current;
  if (!c) return;
  if (c.phase === "queued" && c.eta != null && c.eta > 0) {
    c.eta -= 1;
    renderCountdown();
  } else if (c.phase === "retrying" && c.retryIn > 0) {
    c.retryIn -= 1;
    $("phase").textContent = phaseText(c);
  }
}

// ---- quota and page facts ----

async function refreshQuota() {
  const key = $("key").value, user = $("user").value;
  if (!key || !user) return;
  let u;
  try {
    const r = await fetch(api("/v1/users/" + encodeURIComponent(user) + "/usage"), { headers: { "x-api-key": key }, cache: "no-store" });
    if (!r.ok) return;
    u = await r.json();
  } catch (e) {
    return;
  }
  if (user !== $("user").value) return; // the name changed meanwhile
  const q = $("quota");
  const parts = [];
  if (u.requests && !u.requests.unlimited) parts.push(fmt.format(u.requests.remaining) + " of " + fmt.format(u.requests.limit) + (u.requests.limit === 1 ? " message" : " messages"));
  if (u.tokens && !u.tokens.unlimited) parts.push(fmt.format(u.tokens.remaining) + " of " + fmt.format(u.tokens.limit) + " tokens");
  let text = parts.length ? "You have " + parts.join(" and ") + " left this hour." : "No hourly limit on your messages.";
  if (u.requests && !u.requests.unlimited && u.requests.remaining === 0 && u.requests.reset_at) {
    const at = new Date(u.requests.reset_at);
    if (!isNaN(at)) text += " They come back through the hour, all by " + at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) + ".";
  }
  q.textContent = text;
  q.dataset.requestsRemaining = u.requests && !u.requests.unlimited ? String(u.requests.remaining) : "";
  q.classList.toggle("low", !!u.requests && !u.requests.unlimited && u.requests.remaining <= Math.max(1, u.requests.limit / 10));
  q.hidden = false;
}

async function pageInfo() {
  try {
    const r = await fetch(api("/v1/page-info"), { cache: "no-store" });
    if (!r.ok) return;
    const info = await r.json();
    $("fake-note").hidden = !info.fake_upstream;
  } catch (e) { /* not shown */ }
}

// ---- the conversation ----

function add(cls, text) {
  const li = document.createElement("li");
  li.className = cls;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = cls === "you" ? "You" : cls === "model" ? "Claude" : "Note";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  $("conversation").appendChild(li);
  li.scrollIntoView({ block: "nearest" });
  return body;
}

function busy(on) {
  $("send").disabled = on;
  $("chat").setAttribute("aria-busy", on ? "true" : "false");
}

function finish(note) {
  if (current) {
    if (current.source) current.source.close();
    clearInterval(current.timer);
    clearTimeout(current.placeTimer);
    clearTimeout(current.backTimer);
  }
  current = null;
  store.set("pending", null);
  busy(false);
  render();
  if (note !== undefined) say(note);
  $("msg").focus();
  refreshQuota(); // the tokens are settled to what the answer used
}

// refusal turns sluice's error into the sentence to show, with any time in
// the reader's own clock instead of UTC.
function refusal(body) {
  const err = body && body.error;
  if (!err || !err.message) return "The service could not take this message just now. Please try again in a moment.";
  let msg = err.message;
  if (err.reset_at) {
    const at = new Date(err.reset_at);
    if (!isNaN(at)) {
      const local = at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      msg = msg.replace(/at \d\d:\d\d UTC/, "at " + local);
    }
  }
  return msg;
}

async function send(messages) {
  let res, body;
  try {
    res = await fetch(api("/v1/jobs"), {
      method: "POST",
      headers: { "content-type": "application/json", "x-api-key": $("key").value },
      body: JSON.stringify({
        user_id: $("user").value,
        request: { model: $("model").value, max_tokens: 1024, messages },
      }),
    });
    body = await res.json().catch(() => null);
  } catch (e) {
    return { error: "Could not reach the service. Check your connection and try again." };
  }
  if (!res.ok) return { error: refusal(body) };
  return { job: body };
}

$("chat").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (current) return;
  const text = $("msg").value.trim();
  if (!text) return;
  add("you", text);
  busy(true);
  current = { phase: "sending", position: 0, start: 0, eta: 0, spokenPlace: 0, spokenAt: 0 };
  render();
  say("Sending…");
  const r = await send([...turns, { role: "user", content: text }]);
  if (r.error) {
    add("note", r.error);
    current = null;
    busy(false);
    render();
    say("Not sent.");
    refreshQuota();
    return;
  }
  $("msg").value = "";
  store.set("pending", { id: r.job.id, token: r.job.token, text });
  follow(r.job, text);
  refreshQuota(); // admission took one request and the tokens it may use
});

// Ctrl+Enter (or ⌘+Enter) sends from the message box.
$("msg").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
    ev.preventDefault();
    $("chat").requestSubmit();
  }
});

$("cancel").addEventListener("click", async () => {
  if (!current || !current.id) return;
  current.phase = "canceling";
  render();
  say("Canceling…");
  try {
    await fetch(api("/v1/jobs/" + current.id), { method: "DELETE", headers: { "x-api-key": $("key").value } });
  } catch (e) { /* the stream says what happened */ }
});

$("new").addEventListener("click", () => {
  if (current) return;
  turns = [];
  store.set("turns", turns);
  $("conversation").replaceChildren();
  say("New conversation.");
  $("msg").focus();
});

for (const id of ["key", "user"]) $(id).addEventListener("change", refreshQuota);

function follow(job, text) {
  let answer = null; // the answer's bubble, made when the model starts writing
  let written = "";
  const write = (t) => {
    if (!answer) answer = add("model", "");
    written += t;
    answer.textContent = written;
  };
  const source = new EventSource(api("/v1/jobs/" + job.id + "/events?token=" + encodeURIComponent(job.token)));
  const c = current = {
    id: job.id, source, timer: setInterval(tick, 1000), phase: "connecting", position: 0, start: 0, eta: 0,
    attempt: 0, retryIn: 0, reason: "", spokenPlace: 0, spokenAt: 0, placeTimer: null, centred: false,
  };
  if (job.status === "queued" && job.position > 0) {
    queued({ position: job.position, eta_seconds: job.eta_seconds ?? (job.wait_reason ? null : 0) });
  } else {
    render();
  }
  function queued(d) {
    clearTimeout(c.backTimer);
    const was = c.phase, unknown = c.eta == null;
    c.position = d.position;
    c.eta = d.eta_seconds == null ? null : Math.max(0, Math.round(d.eta_seconds));
    if (!c.start || d.position > c.start) c.start = d.position;
    c.phase = was === "canceling" ? was : "queued";
    render();
    if (c.phase !== "queued") return;
    if (was === "offline" || (c.eta == null && !unknown)) {
      // back after a lost connection, or the upstream went away: say so now
      say((was === "offline" ? "Reconnected. " : "") + placeSentence(c));
      c.spokenPlace = c.position;
      c.spokenAt = Date.now();
    } else {
      sayPlace();
    }
  }
  const data = (e) => JSON.parse(e.data);
  source.addEventListener("queued", (e) => { if (current === c) queued(data(e)); });
  source.addEventListener("started", (e) => {
    if (current !== c) return;
    const d = data(e);
    c.attempt = d.attempt || 1;
    c.position = 0;
    if (c.phase === "canceling") return;
    c.phase = "writing";
    render();
    say(phaseText(c));
  });
  source.addEventListener("retrying", (e) => {
    if (current !== c) return;
    const d = data(e);
    c.position = 0;
    c.reason = d.reason;
    c.retryIn = Math.max(1, Math.ceil(d.retry_in_seconds || 0));
    if (answer) { answer.textContent = ""; written = ""; } // the retry writes the answer again
    if (c.phase === "canceling") return;
    c.phase = "retrying";
    render();
    say(phaseText(c));
  });
  source.addEventListener("delta", (e) => write(data(e).text));
  source.addEventListener("succeeded", () => {
    turns.push({ role: "user", content: text }, { role: "assistant", content: written });
    store.set("turns", turns);
    finish("Answer complete.");
  });
  source.addEventListener("failed", (e) => { add("note", data(e).error.message); finish("Not answered."); });
  source.addEventListener("canceled", () => { add("note", "Canceled. Nothing more is charged for this message."); finish("Canceled."); });
  source.addEventListener("expired", () => { add("note", "This message waited too long and was dropped. Please send it again."); finish("Expired."); });
  // EventSource reconnects by itself, sending Last-Event-ID: nothing is
  // lost. While sluice's store is away each stream it opens is closed at
  // once (event unavailable) and opened again 2 s later: the page says so
  // once, and calls the connection back only when a stream has stayed
  // open a while or an event came (the server sends the current place
  // first thing).
  const lost = () => {
    clearTimeout(c.backTimer);
    if (current !== c || c.phase === "offline") return;
    c.resume = c.phase;
    c.phase = "offline";
    render();
    say(phaseText(c));
  };
  source.addEventListener("unavailable", lost);
  source.onerror = lost;
  source.onopen = () => {
    clearTimeout(c.backTimer);
    c.backTimer = setTimeout(() => { if (source.readyState === EventSource.OPEN) back(); }, 2500);
  };
  function back() {
    if (current !== c || c.phase !== "offline") return;
    c.phase = c.resume;
    render();
    if (c.phase === "queued") {
      say("Reconnected. " + placeSentence(c));
      c.spokenPlace = c.position;
      c.spokenAt = Date.now();
    } else if (c.phase !== "connecting") {
      say("Reconnected. " + phaseText(c));
    }
  }
  source.addEventListener("delta", () => {
    if (c.phase !== "offline") return;
    c.resume = "writing";
    back();
  });
}

// Restore this tab's conversation, and follow a reply still being written.
for (const t of turns) add(t.role === "user" ? "you" : "model", t.content);
const pending = store.get("pending", null);
if (pending) {
  add("you", pending.text);
  busy(true);
  say("Reconnecting…");
  follow(pending, pending.text);
}
pageInfo();
refreshQuota();
setInterval(refreshQuota, 60000); // quotas refill through the hour
