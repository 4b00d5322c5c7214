// sluice's ops dashboard: live model-group state from /v1/admin/status
// every 2 s, the last 24 hours from /v1/admin/usage every 30 s. Charts are
// plain SVG drawn here; nothing to build. The browser sends the admin
// credentials it was asked for when it opened /dashboard.
"use strict";

const STATUS_EVERY = 2000;
const USAGE_EVERY = 30000;
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat();
const num = (n) => fmt.format(Math.round(n));
const pct = (v) => Math.round(v * 100) + "%";
const secs = (v) => (v == null ? "–" : v < 10 ? v.toFixed(2) + " s" : Math.round(v) + " s");
const hourLabel = (iso) => new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
const dimName = { requests: "Requests / min", input_tokens: "Input tokens / min", output_tokens: "Output tokens / min" };
const dimSpoken = { requests: "Requests per minute", input_tokens: "Input tokens per minute", output_tokens: "Output tokens per minute" };

function el(tag, attrs = {}, ...children) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c) e.append(c);
  return e;
}

// api resolves a path against the page's origin, which never holds the
// credentials of a URL like http://ops:KEY@host/dashboard: browsers refuse
// to fetch a URL with credentials in it, and send the ones they remember
// for this origin anyway.
function api(path) { return new URL(path, location.origin).href; }

async function getJSON(url) {
  const r = await fetch(api(url), { headers: { Accept: "application/json" }, cache: "no-store", credentials: "same-origin" });
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const msg = body && body.error && body.error.message ? body.error.message : "The server answered " + r.status + ".";
    throw new Error(msg);
  }
  return body;
}

let problems = {};
function problem(what, err) {
  if (err) problems[what] = err.message || String(err);
  else delete problems[what];
  const p = $("problem");
  const list = Object.values(problems);
  p.hidden = list.length === 0;
  p.textContent = list.length ? "Could not refresh: " + list.join(" ") : "";
}

// ---- now: one card per model group ----

function gauge(label, spoken, l) {
  const inUse = l.in_use, upstream = l.upstream_in_use;
  const cls = inUse >= 0.95 ? "full" : inUse >= 0.75 ? "warn" : "";
  const bar = el("div", { class: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": "100",
    "aria-valuenow": String(Math.round(inUse * 100)), "aria-label": spoken + " in use" },
  el("span", { class: cls, style: "width:" + pct(Math.min(1, inUse)) }));
  let title = num(l.used_last_minute) + " of " + num(l.per_minute) + " in the last minute (" + pct(inUse) + "); sluice's limiter holds " + pct(l.bucket_free) + " of its bucket free";
  if (upstream != null) {
    bar.append(el("b", { style: "left:calc(" + pct(Math.min(1, upstream)) + " - 1px)" }));
    title += "; the upstream's last headers say " + pct(upstream) + " used";
  }
  bar.title = title;
  return el("div", { class: "gauge" }, el("span", { text: label }), bar, el("span", { text: pct(inUse) }));
}

// duration says a number of seconds as "42 s", "3 min 5 s" or "2 h 4 min".
function duration(sec) {
  sec = Math.max(0, Math.round(sec));
  if (sec < 60) return sec + " s";
  if (sec < 3600) return Math.floor(sec / 60) + " min " + (sec % 60) + " s";
  return Math.floor(sec / 3600) + " h " + Math.floor((sec % 3600) / 60) + " min";
}

function figure(label, value, id) {
  return el("div", {}, el("dt", { text: label }), el("dd", { text: value, "data-figure": id }));
}

function renderGroups(status) {
  const box = $("groups");
  box.replaceChildren();
  for (const g of status.groups) {
    const card = el("article", { class: "group", "aria-labelledby": "g-" + g.group, "data-group": g.group },
      el("h3", { id: "g-" + g.group, text: "Model group " + g.group }),
      el("dl", { class: "figures" },
        figure("queued", num(g.queued), "queued"),
        figure("users waiting", num(g.active_users), "active_users"),
        figure("calls running", num(g.in_flight) + " / " + g.max_concurrency, "in_flight"),
        figure("dispatched / min", num(g.dispatched_last_minute), "dispatched"),
        figure("outages", num(g.outages || 0), "outages")));
    for (const l of g.limits) {
      card.append(gauge(dimName[l.dimension] || l.dimension, dimSpoken[l.dimension] || l.dimension, l));
    }
    let state = "Dispatching at full speed.";
    let cls = "state";
    if (g.outage) {
      const o = g.outage;
      state = "Upstream outage for " + duration(o.seconds) + " (since " + new Date(o.since).toLocaleTimeString() +
        "): dispatch stopped; jobs keep their place. " + (o.probing ? "A probe is testing the upstream now."
          : o.next_probe_at ? "Next probe at " + new Date(o.next_probe_at).toLocaleTimeString() + "." : "") +
        " " + num(o.failed_probes) + " probes failed so far.";
      cls += " frozen outage";
    } else if (g.frozen_seconds > 0) {
      state = "Stopped by an upstream 429 for another " + Math.ceil(g.frozen_seconds) + " s.";
      cls += " frozen";
    } else if (g.pace < 1) {
      state = "Slowed to " + pct(g.pace) + " after upstream 529s (overloaded).";
    }
    state += g.upstream_headers_seen_at ? " Upstream limits last seen " + new Date(g.upstream_headers_seen_at).toLocaleTimeString() + " (black mark on each bar)."
      : " No upstream rate-limit headers seen yet.";
    card.append(el("p", { class: cls, text: state }));
    box.append(card);
  }
  if (!status.monitoring) $("monitoring-link").hidden = true;
  $("updated").textContent = "Live state as of " + new Date(status.time).toLocaleTimeString() + ".";
}

// ---- Redis: its eviction policy and memory (the eviction guard's last check) ----

const bytes = (n) => {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 || n >= 100 ? Math.round(n) : n.toFixed(1)) + " " + units[i];
};

function renderRedis(redis) {
  const banner = $("redis-evicting"), mem = $("redis-memory");
  const evicting = !!redis && redis.ok === false;
  const say = evicting ? "Redis evicts keys (policy " + redis.maxmemory_policy +
    "): accepted jobs can be lost. Set maxmemory-policy noeviction." : "";
  banner.hidden = !evicting;
  if (banner.textContent !== say) banner.textContent = say; // an alert: announced when it changes, not every refresh
  const limited = !!redis && redis.maxmemory_bytes > 0;
  mem.hidden = !limited;
  if (limited) {
    const share = redis.used_memory_bytes / redis.maxmemory_bytes;
    mem.textContent = "Redis memory: " + bytes(redis.used_memory_bytes) + " of " + bytes(redis.maxmemory_bytes) + " (" + pct(share) + ")" +
      (share >= 0.8 ? (evicting ? " — nearly full: it will evict keys." : " — nearly full: new jobs will be refused when it is.") : ".");
    mem.className = share >= 0.8 ? "problem" : "hint";
  } else {
    mem.textContent = "";
  }
}

// ---- charts ----

// bars draws stacked bars: series are [{key(bucket) → value, cls, name}].
function bars(box, buckets, series, title) {
  const W = 480, H = 160, L = 44, B = 18, T = 6;
  const totals = buckets.map((b) => series.reduce((s, x) => s + x.key(b), 0));
  const max = niceMax(Math.max(0, ...totals));
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const bw = (W - L) / buckets.length;
  axes(svg, buckets, max, W, H, L, B, T, (v) => (Number.isInteger(v) ? num(v) : v.toFixed(1)));
  buckets.forEach((b, i) => {
    let y = H - B;
    for (const s of series) {
      const v = s.key(b);
      if (v <= 0) continue;
      const h = ((H - B - T) * v) / max;
      y -= h;
      const r = el("svg:rect", { x: L + i * bw + 1, y, width: Math.max(1, bw - 2), height: h, class: s.cls });
      r.append(el("svg:title", { text: hourLabel(b.start) + " · " + s.name + ": " + num(v) }));
      svg.append(r);
    }
  });
  const total = totals.reduce((a, b) => a + b, 0);
  svg.setAttribute("aria-label", title + ": " + num(total) + " in all, at most " + num(Math.max(0, ...totals)) + " in one hour.");
  box.replaceChildren(svg);
  box.dataset.total = String(total);
}

function line(box, buckets, key, title) {
  const W = 480, H = 160, L = 44, B = 18, T = 6;
  const vals = buckets.map(key);
  const present = vals.filter((v) => v != null);
  const max = niceMax(Math.max(0, ...present));
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const bw = (W - L) / buckets.length;
  axes(svg, buckets, max, W, H, L, B, T, (v) => secs(v));
  let d = "";
  vals.forEach((v, i) => {
    if (v == null) return;
    const x = L + i * bw + bw / 2, y = H - B - ((H - B - T) * v) / max;
    d += (d ? " L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
    const c = el("svg:circle", { cx: x, cy: y, r: 3, class: "s-dot" });
    c.append(el("svg:title", { text: hourLabel(buckets[i].start) + " · p95 " + secs(v) }));
    svg.append(c);
  });
  if (d) svg.prepend(el("svg:path", { d, class: "s-line" }));
  svg.setAttribute("aria-label", present.length ? title + ": highest " + secs(Math.max(...present)) + "." : title + ": no answers yet.");
  box.replaceChildren(svg);
  box.dataset.points = String(present.length);
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function axes(svg, buckets, max, W, H, L, B, T, label) {
  for (const f of [0, 0.5, 1]) {
    const y = H - B - (H - B - T) * f;
    svg.append(el("svg:line", { x1: L, x2: W, y1: y, y2: y, class: "s-grid" }));
    svg.append(el("svg:text", { x: L - 4, y: y + 3, "text-anchor": "end", text: label(max * f) }));
  }
  const bw = (W - L) / buckets.length;
  buckets.forEach((b, i) => {
    if (i % 4 !== 0) return;
    svg.append(el("svg:text", { x: L + i * bw + bw / 2, y: H - 4, "text-anchor": "middle", text: hourLabel(b.start) }));
  });
}

// ---- the last 24 hours ----

function renderUsage(rep) {
  const body = $("totals").tBodies[0];
  body.replaceChildren();
  const row = (name, t) => {
    const refused = t.refused.user_quota + t.refused.queue_limit + t.refused.overloaded;
    body.append(el("tr", {},
      el("th", { scope: "row", text: name }),
      el("td", { text: num(t.requests) }),
      el("td", { text: num(t.input_tokens + t.cache_read_input_tokens + t.cache_creation_input_tokens) }),
      el("td", { text: num(t.output_tokens) }),
      el("td", { text: num(t.avg_tokens_per_request) }),
      el("td", { text: num(refused), title: `user quota ${t.refused.user_quota}, queue limit ${t.refused.queue_limit}, overloaded ${t.refused.overloaded}` }),
      el("td", { text: num(t.upstream_429) }),
      el("td", { text: num(t.failed) }),
      el("td", { text: secs(t.latency_seconds.p50) }),
      el("td", { text: secs(t.latency_seconds.p95) }),
      el("td", { text: secs(t.wait_seconds.p95) })));
  };
  for (const t of rep.tenants) row(t.tenant, t.totals);
  if (rep.tenants.length > 1) row("All tenants", rep.totals);

  const bs = rep.buckets;
  bars($("chart-requests"), bs, [{ key: (b) => b.requests, cls: "s-req", name: "requests" }], "Requests answered per hour");
  bars($("chart-tokens"), bs, [
    { key: (b) => b.input_tokens + b.cache_read_input_tokens + b.cache_creation_input_tokens, cls: "s-in", name: "input tokens" },
    { key: (b) => b.output_tokens, cls: "s-out", name: "output tokens" }], "Tokens per hour");
  bars($("chart-refusals"), bs, [
    { key: (b) => b.refused.user_quota, cls: "s-quota", name: "refused: user quota" },
    { key: (b) => b.refused.queue_limit, cls: "s-queue", name: "refused: queue limit" },
    { key: (b) => b.refused.overloaded, cls: "s-over", name: "refused: overloaded" },
    { key: (b) => b.upstream_429, cls: "s-429", name: "upstream 429" }], "Refusals and upstream 429s per hour");
  line($("chart-latency"), bs, (b) => b.latency_seconds.p95, "Latency p95 per hour");

  const top = $("top-users");
  top.replaceChildren();
  for (const t of rep.tenants) {
    const box = el("div", { class: "tenant-top" }, el("h3", { text: "Tenant " + t.tenant }));
    if (!t.top_users.length) {
      box.append(el("p", { class: "hint", text: "No answered requests in the last 24 hours." }));
    } else {
      const tb = el("tbody");
      t.top_users.forEach((u, i) => tb.append(el("tr", {},
        el("td", { text: String(i + 1) }), el("th", { scope: "row", text: u.user_id }),
        el("td", { text: num(u.tokens) }), el("td", { text: num(u.requests) }))));
      box.append(el("table", {},
        el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "#" }), el("th", { scope: "col", text: "User" }),
          el("th", { scope: "col", text: "Tokens" }), el("th", { scope: "col", text: "Requests" }))), tb));
    }
    top.append(box);
  }
}

async function refreshStatus() {
  try {
    const status = await getJSON("/v1/admin/status");
    renderGroups(status);
    renderRedis(status.redis);
    problem("status", null);
  } catch (e) {
    problem("status", e);
  }
}

async function refreshUsage() {
  try {
    renderUsage(await getJSON("/v1/admin/usage?hours=24"));
    problem("usage", null);
    document.body.dataset.loaded = "1";
  } catch (e) {
    problem("usage", e);
  }
}

refreshStatus();
refreshUsage();
setInterval(refreshStatus, STATUS_EVERY);
setInterval(refreshUsage, USAGE_EVERY);
