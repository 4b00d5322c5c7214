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

const ago = (iso) => new Date(iso).toLocaleTimeString();

// gauge is one limit: how much of it went out in the last minute (the
// bar), what sluice's bucket holds free, and where the limit in force
// comes from (configured, the account's as the Admin API states it, the
// upstream's headers).
function gauge(l) {
  const label = dimName[l.dimension] || l.dimension, spoken = dimSpoken[l.dimension] || l.dimension;
  const inUse = l.in_use, upstream = l.upstream_in_use;
  const cls = inUse >= 0.95 ? "full" : inUse >= 0.75 ? "warn" : "";
  const bar = el("div", { class: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": "100",
    "aria-valuenow": String(Math.round(inUse * 100)), "aria-label": spoken + " in use",
    "aria-valuetext": pct(inUse) + ": " + num(l.used_last_minute) + " of " + num(l.per_minute) + " in the last minute" },
  el("span", { class: cls, style: "width:" + pct(Math.min(1, inUse)) }));
  if (upstream != null) {
    bar.append(el("b", { style: "left:calc(" + pct(Math.min(1, upstream)) + " - 1px)" }));
    bar.title = "The black mark: the upstream's last headers say " + pct(upstream) + " used.";
  }
  const free = el("span", { class: l.bucket_free < 0.1 ? "empty" : "", text: "bucket " + pct(l.bucket_free) + " free" });
  const detail = el("p", { class: "limit-detail" },
    el("span", { text: num(l.used_last_minute) + " of " + num(l.per_minute) + " in the last minute" }), free);

  // Where the limit in force comes from: the lowest of these.
  const sources = [["configured", l.configured], ["account", l.account]];
  if (l.upstream_limit != null) sources.push(["upstream headers", l.upstream_limit]);
  const from = sources.filter(([, v]) => v != null && Math.round(v) === Math.round(l.per_minute)).map(([n]) => n);
  const src = el("p", { class: "limit-sources" },
    el("span", { class: "in-force", text: "in force " + num(l.per_minute) + (from.length ? " (" + from[0] + ")" : "") }),
    el("span", { text: "configured " + (l.configured > 0 ? num(l.configured) : "–") }),
    el("span", l.account == null ? { text: "account not read", title: "The account's limits are read from the Anthropic Admin API when ANTHROPIC_ADMIN_KEY is set." }
      : { text: "account " + num(l.account) }));
  if (l.upstream_limit != null) src.append(el("span", { text: "upstream headers " + num(l.upstream_limit) }));
  return el("div", { class: "limit", "data-dimension": l.dimension },
    el("div", { class: "limit-head" }, el("span", { class: "limit-name", text: label }), el("span", { class: "limit-pct " + cls, text: pct(inUse) })),
    bar, detail, src);
}

// duration says a number of seconds as "42 s", "3 min 5 s" or "2 h 4 min".
function duration(sec) {
  sec = Math.max(0, Math.round(sec));
  if (sec < 60) return sec + " s";
  if (sec < 3600) return Math.floor(sec / 60) + " min " + (sec % 60) + " s";
  return Math.floor(sec / 3600) + " h " + Math.floor((sec % 3600) / 60) + " min";
}

function figure(label, value, id, title) {
  const dd = el("dd", { text: value, "data-figure": id });
  if (title) dd.title = title;
  return el("div", {}, el("dt", { text: label }), dd);
}

// holding says what the group is doing and, when jobs wait, what holds
// them, from the same figures the gauges show: an outage, a freeze after
// a 429, every call slot busy, a limit whose bucket is empty, a cache
// write being waited for, a slowed pace. binding names it for tests and
// styles.
function holding(g) {
  const waits = g.queued === 1 ? "1 job waits" : num(g.queued) + " jobs wait";
  const slots = num(g.in_flight) + " of " + num(g.max_concurrency) + " call slots busy";
  if (g.outage) {
    const o = g.outage;
    return { binding: "outage", cls: "bad", text: "Upstream outage for " + duration(o.seconds) + " (since " + ago(o.since) +
      "): dispatch stopped; jobs keep their place. " + (o.probing ? "A probe is testing the upstream now."
      : o.next_probe_at ? "Next probe at " + ago(o.next_probe_at) + "." : "") + " " + num(o.failed_probes) + " probes failed so far." };
  }
  if (g.frozen_seconds > 0) {
    return { binding: "frozen", cls: "bad", text: (g.queued > 0 ? waits + ": held" : "Dispatch stopped") +
      " by an upstream 429 (rate limited) for another " + Math.ceil(g.frozen_seconds) + " s; then sending resumes, paced." };
  }
  if (g.queued === 0) {
    if (g.in_flight > 0) return { binding: "none", cls: "", text: "Nothing waits; " + slots + "." };
    return { binding: "idle", cls: "", text: "Idle: nothing waits and no call is running." };
  }
  if (g.max_concurrency > 0 && g.in_flight >= g.max_concurrency) {
    const busy = g.max_concurrency === 1 ? "its one call slot is busy" : "all " + num(g.max_concurrency) + " call slots are busy";
    return { binding: "concurrency", cls: "held", text: waits + ": held by concurrency, " + busy +
      " (max_concurrency " + g.max_concurrency + "). The next goes when a call finishes." };
  }
  const tight = [...g.limits].sort((a, b) => a.bucket_free - b.bucket_free)[0];
  if (tight && tight.bucket_free < 0.25) {
    const name = (dimSpoken[tight.dimension] || tight.dimension).toLowerCase();
    return { binding: tight.dimension, cls: "held", text: waits + ": held by the " + name + " limit (" + num(tight.per_minute) +
      "), its bucket " + (tight.bucket_free <= 0 ? "empty" : "nearly empty (" + pct(tight.bucket_free) + " free)") +
      "; it refills at " + num(tight.per_minute) + " a minute. " + slots + "." };
  }
  if (g.cache && g.cache.held > 0) {
    return { binding: "cache", cls: "held", text: waits + ": " + num(g.cache.held) + " held until a cache write finishes, so they read the cache instead of writing it again." };
  }
  if (g.pace < 1) {
    return { binding: "pace", cls: "held", text: waits + ": dispatch slowed to " + pct(g.pace) + " of the limits after upstream 529s (overloaded). " + slots + "." };
  }
  return { binding: "dispatching", cls: "", text: waits + ": dispatching as fast as the limits allow; " + slots + "." };
}

function renderGroups(status) {
  const box = $("groups");
  box.replaceChildren();
  for (const g of status.groups) {
    const h = holding(g);
    const card = el("article", { class: "group", "aria-labelledby": "g-" + g.group, "data-group": g.group },
      el("h3", { id: "g-" + g.group, text: "Model group " + g.group }),
      el("p", { class: "state " + h.cls, "data-binding": h.binding, text: h.text }),
      el("dl", { class: "figures" },
        figure("queued", num(g.queued), "queued"),
        figure("users waiting", num(g.active_users), "active_users"),
        figure("calls running", num(g.in_flight) + " / " + g.max_concurrency, "in_flight", "calls in flight / max_concurrency"),
        figure("dispatched / min", num(g.dispatched_last_minute), "dispatched"),
        figure("outages", num(g.outages || 0), "outages")));
    if (g.max_concurrency > 0 && g.in_flight >= g.max_concurrency) card.querySelector('[data-figure="in_flight"]').classList.add("full");
    card.append(el("div", { class: "limits" }, ...g.limits.map(gauge)));
    // The prompt cache, when the status reports it and there is something
    // to say: no answer in the window and nothing held is nothing.
    const c = g.cache;
    if (c && (c.read_ratio != null || c.held > 0 || c.read_tokens > 0 || c.creation_tokens > 0)) {
      const ws = c.window_seconds > 0 ? (c.window_seconds % 60 === 0 ? c.window_seconds / 60 + " min" : duration(c.window_seconds)) : "";
      const line = el("p", { class: "cache", "data-cache": "1",
        title: num(c.read_tokens) + " input tokens read from the prompt cache, " + num(c.creation_tokens) + " written to it" +
          (ws ? ", in the last " + ws : "") + "." },
      el("span", { text: "cache reads " + (c.read_ratio == null ? "–" : pct(c.read_ratio)) }));
      if (ws) line.append(el("span", { class: "hint", text: "of input, last " + ws }));
      if (c.held > 0) line.append(el("span", { class: "held", text: num(c.held) + " held for a cache write" }));
      card.append(line);
    }
    card.append(el("p", { class: "hint seen", text: g.upstream_headers_seen_at
      ? "Upstream limits last seen " + ago(g.upstream_headers_seen_at) + " (black mark on each bar)."
      : "No upstream rate-limit headers seen yet." }));
    if (g.pace < 1 && h.binding !== "pace") card.append(el("p", { class: "hint", text: "Pace " + pct(g.pace) + " after upstream 529s (overloaded)." }));
    box.append(card);
  }
  box.dataset.groups = String(status.groups.length);
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

// compact writes a count short enough for an axis: 950, 12K, 1.5M.
const compactFmt = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
const countTick = (v) => (v < 10000 ? num(v) : compactFmt.format(v));
const secsFmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 3 });
const secsTick = (v) => secsFmt.format(v) + " s";

// ticks are an axis's round steps from 0 to at least max: 1, 2, 2.5 or 5
// times a power of ten, about four of them; whole numbers only for counts
// (integer), never 0 / 0.5 / 1.
function ticks(max, integer) {
  if (!(max > 0)) return [0, 1];
  const raw = max / 4;
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const mults = integer && p < 10 ? [1, 2, 5, 10] : [1, 2, 2.5, 5, 10];
  let step = 10 * p;
  for (const m of mults) {
    if (m * p >= raw) { step = m * p; break; }
  }
  if (integer) step = Math.max(1, Math.round(step));
  const n = Math.max(1, Math.ceil(max / step - 1e-9));
  const out = [];
  for (let i = 0; i <= n; i++) out.push(Number((i * step).toPrecision(12)));
  return out;
}

// bars draws stacked bars: series are [{key(bucket) → value, cls, name}].
function bars(box, buckets, series, title) {
  const W = 480, H = 160, L = 44, B = 18, T = 8;
  const totals = buckets.map((b) => series.reduce((s, x) => s + x.key(b), 0));
  const ts = ticks(Math.max(0, ...totals), true);
  const max = ts[ts.length - 1];
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const bw = (W - L) / buckets.length;
  axes(svg, buckets, ts, W, H, L, B, T, countTick);
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
  const W = 480, H = 160, L = 44, B = 18, T = 8;
  const vals = buckets.map(key);
  const present = vals.filter((v) => v != null);
  const ts = ticks(Math.max(0, ...present), false);
  const max = ts[ts.length - 1];
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const bw = (W - L) / buckets.length;
  axes(svg, buckets, ts, W, H, L, B, T, secsTick);
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

// axes draws a grid line and a label at each tick (the top tick is the
// chart's top) and every fourth hour along the bottom.
function axes(svg, buckets, ts, W, H, L, B, T, label) {
  const max = ts[ts.length - 1];
  for (const v of ts) {
    const y = H - B - ((H - B - T) * v) / max;
    svg.append(el("svg:line", { x1: L, x2: W, y1: y, y2: y, class: v === 0 ? "s-axis" : "s-grid" }));
    svg.append(el("svg:text", { x: L - 4, y: y + 3, "text-anchor": "end", class: "tick", "data-value": String(v), text: label(v) }));
  }
  const bw = (W - L) / buckets.length;
  buckets.forEach((b, i) => {
    if (i % 4 !== 0) return;
    svg.append(el("svg:text", { x: L + i * bw + bw / 2, y: H - 4, "text-anchor": "middle", text: hourLabel(b.start) }));
  });
}

// ---- the last 24 hours ----

// usd formats dollars: cents from a dollar up, else four decimals.
function usd(v) {
  if (!v) return "$0";
  return "$" + (v >= 1 ? v.toFixed(2) : v.toFixed(4));
}

function renderUsage(rep) {
  const body = $("totals").tBodies[0];
  body.replaceChildren();
  const row = (name, t) => {
    const refused = t.refused.user_quota + t.refused.queue_limit + t.refused.overloaded + (t.refused.budget || 0);
    body.append(el("tr", {},
      el("th", { scope: "row", text: name }),
      el("td", { text: num(t.requests) }),
      el("td", { text: num(t.input_tokens + t.cache_read_input_tokens + t.cache_creation_input_tokens) }),
      el("td", { text: num(t.output_tokens) }),
      el("td", { text: usd(t.cost_usd), title: t.unpriced_calls ? `${t.unpriced_calls} calls of models without a price are not counted` : "at the configured prices" }),
      el("td", { text: num(t.avg_tokens_per_request) }),
      el("td", { text: num(refused), title: `user quota ${t.refused.user_quota}, queue limit ${t.refused.queue_limit}, overloaded ${t.refused.overloaded}, budget ${t.refused.budget || 0}` }),
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
    { key: (b) => b.refused.budget || 0, cls: "s-budget", name: "refused: budget" },
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
        el("td", { text: num(u.tokens) }), el("td", { text: num(u.requests) }), el("td", { text: usd(u.cost_usd) }))));
      box.append(el("table", {},
        el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "#" }), el("th", { scope: "col", text: "User" }),
          el("th", { scope: "col", text: "Tokens" }), el("th", { scope: "col", text: "Requests" }),
          el("th", { scope: "col", text: "Cost" }))), tb));
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
