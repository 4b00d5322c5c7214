// The chat page: submit a job, follow its events with the job's own token
// (EventSource cannot send headers), show the place in line counting down,
// then the answer as it is written. Every refusal is shown as the sentence
// sluice sends, never as a status code.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.hash.slice(1));
for (const k of ["key", "user", "model"]) if (params.get(k)) $(k).value = params.get(k);
if ($("key").value) $("settings").open = false;

let current = null; // {id, source, timer}

function say(text) { $("status").textContent = text; }

function add(cls, text) {
  const li = document.createElement("li");
  li.className = cls;
  li.textContent = text;
  $("conversation").appendChild(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
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
  busy(false);
  if (note) say(note);
  $("msg").focus();
}

function waitText(position, eta) {
  const place = position === 1 ? "You're next in line" : "You're #" + position + " in line";
  if (eta <= 0) return place + " · starting any moment";
  if (eta < 90) return place + " · about " + eta + " s";
  return place + " · about " + Math.round(eta / 60) + " min";
}

async function send(text) {
  let res, body;
  try {
    res = await fetch("/v1/jobs", {
      method: "POST",
      headers: { "content-type": "application/json", "x-api-key": $("key").value },
      body: JSON.stringify({
        user_id: $("user").value,
        request: { model: $("model").value, max_tokens: 512, messages: [{ role: "user", content: text }] },
      }),
    });
    body = await res.json();
  } catch (e) {
    return { error: "Could not reach the service. Check your connection and try again." };
  }
  if (!res.ok) {
    const msg = body && body.error && body.error.message;
    return { error: msg || "The service could not take this message just now. Please try again in a moment." };
  }
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
  const r = await send(text);
  if (r.error) {
    add("note", r.error);
    finish("");
    return;
  }
  $("msg").value = "";
  follow(r.job);
});

$("cancel").addEventListener("click", async () => {
  if (!current) return;
  const id = current.id;
  try {
    await fetch("/v1/jobs/" + id, { method: "DELETE", headers: { "x-api-key": $("key").value } });
  } catch (e) { /* the stream says what happened */ }
});

function follow(job) {
  let answer = null; // the answer's bubble, made when the model starts writing
  const write = (text) => {
    if (!answer) answer = add("model", "");
    answer.textContent += text;
  };
  const source = new EventSource("/v1/jobs/" + job.id + "/events?token=" + encodeURIComponent(job.token));
  current = { id: job.id, source, timer: null, eta: 0, position: 0 };
  const tick = () => {
    if (!current || current.position === 0) return;
    current.eta = Math.max(0, current.eta - 1);
    say(waitText(current.position, current.eta));
  };
  current.timer = setInterval(tick, 1000);
  source.addEventListener("queued", (e) => {
    const d = JSON.parse(e.data);
    current.position = d.position;
    current.eta = d.eta_seconds;
    say(waitText(d.position, d.eta_seconds));
  });
  source.addEventListener("started", () => { current.position = 0; say("Writing…"); });
  source.addEventListener("retrying", (e) => {
    const d = JSON.parse(e.data);
    current.position = 0;
    say("The model is busy; trying again in " + Math.max(1, Math.ceil(d.retry_in_seconds)) + " s…");
  });
  source.addEventListener("delta", (e) => write(JSON.parse(e.data).text));
  source.addEventListener("succeeded", () => finish("Done."));
  source.addEventListener("failed", (e) => { add("note", JSON.parse(e.data).error.message); finish(""); });
  source.addEventListener("canceled", () => finish("Canceled."));
  source.addEventListener("expired", () => { add("note", "This message waited too long and was dropped. Please send it again."); finish(""); });
  source.onerror = () => { if (current) say("Connection lost; reconnecting…"); };
}
