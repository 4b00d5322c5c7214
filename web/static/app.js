// The chat page: submit a job, follow its events with the job's own token
// (EventSource cannot send headers), show the place in line counting down,
// then the answer as it is written. Every refusal is shown as the sentence
// sluice sends, never as a status code.
//
// The conversation lives in this tab's sessionStorage: each tab is its own
// conversation, a reload keeps it, and a reply still being written when the
// page reloads is followed again from its first event.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.hash.slice(1));

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

// turns: what the model sees next time, [{role, content}]; pending: the job
// being answered, {id, token, text}.
let turns = store.get("turns", []);
let current = null; // {id, source, timer, eta, position}

function say(text) { $("status").textContent = text; }

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
  $("cancel").hidden = !on;
  $("chat").setAttribute("aria-busy", on ? "true" : "false");
}

function finish(note) {
  if (current) {
    if (current.source) current.source.close();
    clearInterval(current.timer);
  }
  current = null;
  store.set("pending", null);
  busy(false);
  if (note !== undefined) say(note);
  $("msg").focus();
}

function waitText(position, eta) {
  const place = position === 1 ? "You're next in line" : "You're #" + position + " in line";
  if (eta <= 0) return place + " · starting any moment";
  if (eta < 90) return place + " · about " + eta + " s";
  return place + " · about " + Math.round(eta / 60) + " min";
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
  say("Sending…");
  const r = await send([...turns, { role: "user", content: text }]);
  if (r.error) {
    add("note", r.error);
    busy(false);
    say("Not sent.");
    return;
  }
  $("msg").value = "";
  store.set("pending", { id: r.job.id, token: r.job.token, text });
  follow(r.job, text);
});

// Ctrl+Enter (or ⌘+Enter) sends from the message box.
$("msg").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
    ev.preventDefault();
    $("chat").requestSubmit();
  }
});

$("cancel").addEventListener("click", async () => {
  if (!current) return;
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

function follow(job, text) {
  let answer = null; // the answer's bubble, made when the model starts writing
  let written = "";
  const write = (t) => {
    if (!answer) answer = add("model", "");
    written += t;
    answer.textContent = written;
  };
  const source = new EventSource(api("/v1/jobs/" + job.id + "/events?token=" + encodeURIComponent(job.token)));
  current = { id: job.id, source, timer: null, eta: 0, position: 0 };
  const tick = () => {
    if (!current || current.position === 0) return;
    current.eta = Math.max(0, current.eta - 1);
    say(waitText(current.position, current.eta));
  };
  current.timer = setInterval(tick, 1000);
  const data = (e) => JSON.parse(e.data);
  source.addEventListener("queued", (e) => {
    const d = data(e);
    current.position = d.position;
    current.eta = d.eta_seconds;
    say(waitText(d.position, d.eta_seconds));
  });
  source.addEventListener("started", () => { current.position = 0; say("Writing…"); });
  source.addEventListener("retrying", (e) => {
    const d = data(e);
    current.position = 0;
    if (answer) { answer.textContent = ""; written = ""; } // the retry writes the answer again
    say("The model is busy; trying again in " + Math.max(1, Math.ceil(d.retry_in_seconds)) + " s…");
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
  // EventSource reconnects by itself, sending Last-Event-ID: nothing is lost.
  source.onerror = () => { if (current) say("Connection lost; reconnecting…"); };
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
