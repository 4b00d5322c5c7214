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
	if len(row) < 11 {
		t.Fatalf("no totals row for tenant acme: %v", row)
	}
	if row[1] != "3" || row[5] != "1" || strings.ReplaceAll(row[3], ",", "") != strconv.Itoa(answered.OutputTokens) {
		t.Errorf("acme's row %v: want 3 requests, %d output tokens, 1 refused", row, answered.OutputTokens)
	}
	if row[9] == "–" {
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
