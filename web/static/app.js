// The demo page: submit a job, follow its events with the job's own token
// (EventSource cannot send headers), show the position, then the text.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.hash.slice(1));
if (params.get("key")) $("key").value = params.get("key");
if (params.get("user")) $("user").value = params.get("user");
if (params.get("model")) $("model").value = params.get("model");

let source = null;

function say(text) { $("status").textContent = text; }

function friendly(err, status) {
  if (err && err.message) return err.message;
  return "Something went wrong (" + status + "). Please try again.";
}

$("chat").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (source) source.close();
  $("answer").textContent = "";
  say("Sending…");
  let res, body;
  try {
    res = await fetch("/v1/jobs", {
      method: "POST",
      headers: { "content-type": "application/json", "x-api-key": $("key").value },
      body: JSON.stringify({
        user_id: $("user").value,
        request: { model: $("model").value, max_tokens: 512, messages: [{ role: "user", content: $("msg").value }] },
      }),
    });
    body = await res.json();
  } catch (e) {
    say("Could not reach sluice. Check your connection and try again.");
    return;
  }
  if (!res.ok) { say(friendly(body.error, res.status)); return; }
  follow(body);
});

function follow(job) {
  const url = "/v1/jobs/" + job.id + "/events?token=" + encodeURIComponent(job.token);
  source = new EventSource(url);
  source.addEventListener("queued", (e) => {
    const d = JSON.parse(e.data);
    say(d.position === 1 ? "You're next in line." : "You're #" + d.position + " in line · about " + d.eta_seconds + " s");
  });
  source.addEventListener("started", () => say("Writing…"));
  source.addEventListener("retrying", (e) => {
    const d = JSON.parse(e.data);
    say("The model is busy; trying again in " + Math.ceil(d.retry_in_seconds) + " s…");
  });
  source.addEventListener("delta", (e) => { $("answer").textContent += JSON.parse(e.data).text; });
  source.addEventListener("succeeded", () => { say("Done."); source.close(); });
  source.addEventListener("failed", (e) => { say(JSON.parse(e.data).error.message); source.close(); });
  source.addEventListener("canceled", () => { say("Canceled."); source.close(); });
  source.addEventListener("expired", () => { say("This request waited too long and was dropped. Please send it again."); source.close(); });
}
