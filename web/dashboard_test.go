package web_test

import (
	"context"
	"encoding/base64"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/browser"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

// asAdmin makes the browser send the admin key as basic auth, as a person
// would after the browser asked for it.
func asAdmin(key string) chromedp.Action[chromedp.Void] {
	return func(ctx context.Context, tg *chromedp.Target) (chromedp.Void, error) {
		if _, err := cdp.Call(ctx, tg, network.Enable, network.EnableParams{}); err != nil {
			return chromedp.Void{}, err
		}
		auth := "Basic " + base64.StdEncoding.EncodeToString([]byte("ops:"+key))
		_, err := cdp.Call(ctx, tg, network.SetExtraHTTPHeaders, network.SetExtraHTTPHeadersParams{Headers: network.Headers{"Authorization": auth}})
		return chromedp.Void{}, err
	}
}

// TestDashboard drives /dashboard in headless Chromium: two users' jobs
// wait (the page shows the queue and the users), a worker answers them
// and one more is refused over its quota; after a reload the last 24
// hours show the answered requests, the refusal, the tokens and the top
// users. A screenshot is saved for people to look at.
func TestDashboard(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, TenantExtra: "    requests_per_hour: 2\n"})
	var ids []string
	for _, u := range []string{"ann", "ann", "bob"} {
		ids = append(ids, e.Submit(t, harness.JobBody(u, "how do token buckets refill?")).ID)
	}
	ctx := browser.New(t, 90*time.Second)
	must(t, chromedp.Do(ctx, asAdmin(harness.AdminKey), chromedp.Navigate(e.API.URL+"/dashboard")))
	waitText(t, ctx, "#updated", "Live state as of")
	figure := func(name string) string {
		return eval[string](t, ctx, `(document.querySelector('[data-group="sonnet"] [data-figure="`+name+`"]') || {}).textContent || ""`)
	}
	if q, u := figure("queued"), figure("active_users"); q != "3" || u != "2" {
		t.Errorf("the page shows %q queued and %q users waiting, want 3 and 2", q, u)
	}
	if n := eval[int](t, ctx, `document.querySelectorAll('[data-group="sonnet"] [role="meter"]').length`); n != 3 {
		t.Errorf("%d limiter gauges, want requests, input and output tokens", n)
	}

	harness.StartWorker(t, e)
	var answered jobs.Usage
	for _, id := range ids {
		v := e.WaitTerminal(t, id, 20*time.Second)
		if v.Status != jobs.Succeeded {
			t.Fatalf("job %s %s", id, v.Status)
		}
		answered.OutputTokens += v.Usage.OutputTokens
	}
	if resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("ann", "one too many")); resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("ann's third job: %d %s", resp.StatusCode, b)
	}

	// The live figures follow without a reload (every 2 s).
	waitText(t, ctx, `[data-group="sonnet"] [data-figure="queued"]`, "0")
	if u := figure("active_users"); u != "0" {
		t.Errorf("after the jobs ran the page shows %q users waiting", u)
	}

	must(t, chromedp.Do(ctx, chromedp.Reload()))
	must(t, chromedp.Do(ctx, chromedp.WaitReady(`body[data-loaded="1"]`)))
	row := eval[[]string](t, ctx, `[...document.querySelectorAll("#totals tbody tr")].find(r => r.cells[0].textContent === "acme") ? [...[...document.querySelectorAll("#totals tbody tr")].find(r => r.cells[0].textContent === "acme").cells].map(c => c.textContent) : []`)
	if len(row) < 12 {
		t.Fatalf("no totals row for tenant acme: %v", row)
	}
	if row[1] != "3" || row[6] != "1" || strings.ReplaceAll(row[3], ",", "") != strconv.Itoa(answered.OutputTokens) {
		t.Errorf("acme's row %v: want 3 requests, %d output tokens, 1 refused", row, answered.OutputTokens)
	}
	if !strings.HasPrefix(row[4], "$") || row[4] == "$0" {
		t.Errorf("acme's row %v: no cost shown for three priced answers", row)
	}
	if row[10] == "–" {
		t.Errorf("no p95 latency shown: %v", row)
	}
	if got := eval[string](t, ctx, `document.getElementById("chart-requests").dataset.total`); got != "3" {
		t.Errorf("the requests chart adds up to %q", got)
	}
	if got := eval[string](t, ctx, `document.getElementById("chart-refusals").dataset.total`); got != "1" {
		t.Errorf("the refusals chart adds up to %q", got)
	}
	if got := eval[string](t, ctx, `document.getElementById("chart-latency").dataset.points`); got != "1" {
		t.Errorf("the latency chart has %q points, want this hour's", got)
	}
	// Count axes: whole numbers in round steps (3 requests: 0, 1, 2, 3; never 0 / 0.5 / 1).
	checkCountTicks(t, ctx, "chart-requests", 3)
	checkCountTicks(t, ctx, "chart-refusals", 1)
	checkCountTicks(t, ctx, "chart-tokens", 1)
	if vals := eval[[]float64](t, ctx, `[...document.querySelectorAll("#chart-requests text.tick")].map(n => +n.dataset.value)`); len(vals) != 4 || vals[3] != 3 {
		t.Errorf("the requests chart's ticks are %v, want 0, 1, 2, 3", vals)
	}
	users := eval[[]string](t, ctx, `[...document.querySelectorAll("#top-users tbody th")].map(c => c.textContent)`)
	if len(users) != 2 || users[0] != "ann" {
		t.Errorf("top users %v, want ann (two answers) first, then bob", users)
	}
	if label := eval[string](t, ctx, `document.querySelector("#chart-tokens svg").getAttribute("aria-label")`); !strings.HasPrefix(label, "Tokens per hour:") {
		t.Errorf("the tokens chart is not described for screen readers: %q", label)
	}
	if !eval[bool](t, ctx, `document.getElementById("problem").hidden`) {
		t.Errorf("the page shows a problem: %s", eval[string](t, ctx, `document.getElementById("problem").textContent`))
	}

	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	must(t, err)
	shot := browser.ArtifactPath(t, "dashboard.png")
	must(t, os.WriteFile(shot, png, 0o644))
	t.Logf("screenshot: %s", shot)
}

// TestDashboardFromACredentialsURL opens the dashboard the way a script or
// a bookmark does, with the admin key in the URL
// (http://ops:KEY@host/dashboard): the page's own requests must not carry
// the URL's credentials (browsers refuse to fetch such URLs) yet still be
// authorized.
func TestDashboardFromACredentialsURL(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	e.Submit(t, harness.JobBody("ann", "waiting"))
	ctx := browser.New(t, 60*time.Second)
	u := strings.Replace(e.API.URL, "http://", "http://ops:"+harness.AdminKey+"@", 1) + "/dashboard"
	must(t, chromedp.Do(ctx, chromedp.Navigate(u)))
	waitText(t, ctx, "#updated", "Live state as of")
	if !eval[bool](t, ctx, `document.getElementById("problem").hidden`) {
		t.Fatalf("the page shows a problem: %s", eval[string](t, ctx, `document.getElementById("problem").textContent`))
	}
	if q := eval[string](t, ctx, `(document.querySelector('[data-group="sonnet"] [data-figure="queued"]') || {}).textContent || ""`); q != "1" {
		t.Fatalf("the page shows %q queued, want 1", q)
	}
}

// TestDashboardNamesWhatHolds: one call slot, held by a slow upstream,
// and two more jobs waiting while the per-minute limits are barely used.
// The dashboard's status line must name concurrency as what holds them
// (not say "full speed" beside near-empty gauges); each limit shows the
// configured value and the account's next to the limit in force; three
// model groups are laid out side by side; a group's prompt-cache figures
// show when the status carries them (and say something). A screenshot is
// saved.
func TestDashboardNamesWhatHolds(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, MaxConcurrency: 1,
		Fake: fakeanthropic.Config{Latency: time.Minute}, // the one call stays in flight
		GroupExtra: `  - name: haiku
    models: ["claude-haiku-*"]
    rpm: 4000
    input_tpm: 400000
    output_tpm: 80000
  - name: opus
    models: ["claude-opus-*"]
    rpm: 2000
    input_tpm: 200000
    output_tpm: 40000
`})
	sonnet := &e.Config.ModelGroups[0]
	// The account allows fewer requests than configured: that limit is in force.
	must(t, e.Sched.SetAccountLimits(context.Background(), sonnet, 3000, 0, 0))
	var ids []string
	for _, u := range []string{"ann", "bob", "cy"} {
		ids = append(ids, e.Submit(t, harness.JobBody(u, "a long answer")).ID)
	}
	harness.StartWorker(t, e)
	harness.Eventually(t, 20*time.Second, func() bool { return e.Get(t, ids[0]).Status == jobs.Running }, "the first job to run")

	ctx := browser.New(t, 90*time.Second)
	must(t, chromedp.Do(ctx, chromedp.EmulateViewport(1280, 900), asAdmin(harness.AdminKey), chromedp.Navigate(e.API.URL+"/dashboard")))
	state := waitText(t, ctx, `[data-group="sonnet"] .state[data-binding="concurrency"]`, "concurrency")
	for _, want := range []string{"2 jobs wait", "held by concurrency", "call slot", "max_concurrency 1"} {
		if !strings.Contains(state, want) {
			t.Errorf("the status line %q does not say %q", state, want)
		}
	}
	for _, wrong := range []string{"full speed", "as fast as the limits allow"} {
		if strings.Contains(state, wrong) {
			t.Errorf("the status line %q says %q while jobs are held", state, wrong)
		}
	}
	if use := eval[int](t, ctx, `+document.querySelector('[data-group="sonnet"] [data-dimension="requests"] [role="meter"]').getAttribute("aria-valuenow")`); use >= 50 {
		t.Errorf("the requests gauge is at %d%%: the scenario wants low per-minute use", use)
	}
	if running := eval[string](t, ctx, `document.querySelector('[data-group="sonnet"] [data-figure="in_flight"]').textContent`); running != "1 / 1" {
		t.Errorf("calls running shows %q, want 1 / 1", running)
	}

	// Each limit: in force, configured, the account's.
	sources := eval[string](t, ctx, `document.querySelector('[data-group="sonnet"] [data-dimension="requests"] .limit-sources').textContent`)
	for _, want := range []string{"in force 3,000 (account)", "configured 6,000", "account 3,000"} {
		if !strings.Contains(sources, want) {
			t.Errorf("the requests limit says %q, want %q", sources, want)
		}
	}
	if s := eval[string](t, ctx, `document.querySelector('[data-group="sonnet"] [data-dimension="input_tokens"] .limit-sources').textContent`); !strings.Contains(s, "in force 10,000,000 (configured)") || !strings.Contains(s, "account not read") {
		t.Errorf("the input limit says %q, want the configured limit in force and the account's not read", s)
	}
	// Large enough to read at a glance.
	if px := eval[float64](t, ctx, `document.querySelector('[data-group="sonnet"] .bar').getBoundingClientRect().height`); px < 18 {
		t.Errorf("the gauges are %.0f px tall", px)
	}

	// Several groups side by side, using the page's width.
	type card struct{ Top, Left, Width, Page float64 }
	cards := eval[[]card](t, ctx, `[...document.querySelectorAll("#groups .group")].map(n => { const r = n.getBoundingClientRect();
		return { Top: r.top, Left: r.left, Width: r.width, Page: document.getElementById("groups").getBoundingClientRect().width }; })`)
	if len(cards) != 3 {
		t.Fatalf("%d group cards, want 3", len(cards))
	}
	if cards[0].Top != cards[1].Top || cards[1].Left <= cards[0].Left+cards[0].Width/2 {
		t.Errorf("the first two groups are not side by side: %+v", cards[:2])
	}
	if used := cards[0].Width + cards[1].Width; used < cards[0].Page*0.9 {
		t.Errorf("two groups use %.0f px of the %.0f px row", used, cards[0].Page)
	}
	if state := eval[string](t, ctx, `document.querySelector('[data-group="haiku"] .state').dataset.binding`); state != "idle" {
		t.Errorf("the idle haiku group's status is %q", state)
	}
	shoot(t, ctx, "dashboard-held.png")

	// A group's prompt-cache figures, when the status has them.
	cache := eval[[]string](t, ctx, `(() => {
		renderGroups({ time: new Date().toISOString(), monitoring: "/monitoring/", groups: [
			{ group: "a", queued: 0, active_users: 0, in_flight: 0, max_concurrency: 4, dispatched_last_minute: 0, frozen_seconds: 0, pace: 1, outages: 0, limits: [],
			  cache: { read_ratio: 0.934, input_tokens: 10000, read_tokens: 9340, creation_tokens: 660, window_seconds: 300, held: 2 } },
			{ group: "b", queued: 0, active_users: 0, in_flight: 0, max_concurrency: 4, dispatched_last_minute: 0, frozen_seconds: 0, pace: 1, outages: 0, limits: [],
			  cache: { read_ratio: null, input_tokens: 0, read_tokens: 0, creation_tokens: 0, window_seconds: 300, held: 0 } },
			{ group: "c", queued: 0, active_users: 0, in_flight: 0, max_concurrency: 4, dispatched_last_minute: 0, frozen_seconds: 0, pace: 1, outages: 0, limits: [] }] });
		return ["a", "b", "c"].map(g => (document.querySelector('[data-group="' + g + '"] .cache') || { textContent: "(none)" }).textContent);
	})()`)
	if want := []string{"cache reads 93%of input, last 5 min2 held for a cache write", "(none)", "(none)"}; strings.Join(cache, "|") != strings.Join(want, "|") {
		t.Errorf("the cache lines are %q, want %q", cache, want)
	}

	// The other things that hold jobs, each named from the status's own
	// figures (the first that applies wins).
	holds := eval[[][2]string](t, ctx, `(() => {
		const base = { queued: 3, active_users: 2, in_flight: 2, max_concurrency: 8, frozen_seconds: 0, pace: 1, outage: null,
			limits: [{ dimension: "requests", per_minute: 50, bucket_free: 0.8 }, { dimension: "input_tokens", per_minute: 30000, bucket_free: 0 }] };
		const roomy = [{ dimension: "requests", per_minute: 50, bucket_free: 0.8 }];
		return [
			base,
			{ ...base, frozen_seconds: 11.2 },
			{ ...base, outage: { since: new Date().toISOString(), seconds: 42, failed_probes: 3, probing: true } },
			{ ...base, limits: roomy, cache: { read_ratio: 0.5, read_tokens: 1, creation_tokens: 1, held: 2 } },
			{ ...base, limits: roomy, pace: 0.5 },
			{ ...base, limits: roomy },
			{ ...base, queued: 0, in_flight: 0 },
		].map(g => { const h = holding(g); return [h.binding, h.text]; });
	})()`)
	want := []struct{ binding, says string }{
		{"input_tokens", "held by the input tokens per minute limit (30,000), its bucket empty"},
		{"frozen", "held by an upstream 429 (rate limited) for another 12 s"},
		{"outage", "Upstream outage for 42 s"},
		{"cache", "2 held until a cache write finishes"},
		{"pace", "slowed to 50%"},
		{"dispatching", "3 jobs wait: dispatching"},
		{"idle", "Idle"},
	}
	for i, w := range want {
		if i >= len(holds) || holds[i][0] != w.binding || !strings.Contains(holds[i][1], w.says) {
			t.Errorf("case %d: the status line is %q, want %s saying %q", i, holds[min(i, len(holds)-1)], w.binding, w.says)
		}
	}
}

// checkCountTicks: a count chart's axis labels are whole numbers in equal
// steps from 0, the top at or above the highest bar.
func checkCountTicks(t *testing.T, ctx context.Context, chart string, highest float64) {
	t.Helper()
	vals := eval[[]float64](t, ctx, `[...document.querySelectorAll("#`+chart+` text.tick")].map(n => +n.dataset.value)`)
	labels := eval[[]string](t, ctx, `[...document.querySelectorAll("#`+chart+` text.tick")].map(n => n.textContent)`)
	if len(vals) < 2 || vals[0] != 0 || vals[len(vals)-1] < highest {
		t.Fatalf("%s: ticks %v (%q) do not run from 0 to %v", chart, vals, labels, highest)
	}
	step := vals[1] - vals[0]
	for i, v := range vals {
		if v != float64(int64(v)) {
			t.Errorf("%s: tick %v is not a whole number: %q", chart, v, labels)
		}
		if i > 0 && vals[i]-vals[i-1] != step {
			t.Errorf("%s: uneven ticks %v", chart, vals)
		}
		if strings.ContainsAny(labels[i], ".") {
			t.Errorf("%s: tick label %q shows a fraction", chart, labels[i])
		}
	}
	if len(vals) > 7 {
		t.Errorf("%s: %d ticks, too many to read", chart, len(vals))
	}
}
