package web_test

import (
	"context"
	"encoding/json"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/accessibility"
	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/chromedp"

	"github.com/sluice-dev/sluice/internal/browser"
	"github.com/sluice-dev/sluice/internal/harness"
)

type axNode struct{ role, name string }

// axTree is what a screen reader gets: Chromium's accessibility tree.
func axTree(t *testing.T, ctx context.Context) []axNode {
	t.Helper()
	res, err := chromedp.Run(ctx, func(ctx context.Context, tg *chromedp.Target) (accessibility.GetFullAXTreeResult, error) {
		return cdp.Call(ctx, tg, accessibility.GetFullAXTree, accessibility.GetFullAXTreeParams{})
	})
	must(t, err)
	str := func(v *accessibility.Value) string {
		if v == nil {
			return ""
		}
		var s string
		_ = json.Unmarshal([]byte(v.Value), &s)
		return strings.TrimSpace(s)
	}
	var out []axNode
	for _, n := range res.Nodes {
		if n.Ignored {
			continue
		}
		out = append(out, axNode{role: str(n.Role), name: str(n.Name)})
	}
	return out
}

// checkNames fails for every control, link, image or meter a screen
// reader would announce without a name, and for a page with no main
// landmark or no heading.
func checkNames(t *testing.T, page string, nodes []axNode) {
	t.Helper()
	needName := map[string]bool{"button": true, "textbox": true, "link": true, "combobox": true, "checkbox": true,
		"meter": true, "image": true, "img": true, "slider": true, "spinbutton": true, "listbox": true, "DisclosureTriangle": true}
	roles := map[string]int{}
	for _, n := range nodes {
		roles[n.role]++
		if needName[n.role] && n.name == "" {
			t.Errorf("%s: a %s has no accessible name", page, n.role)
		}
	}
	if roles["main"] == 0 {
		t.Errorf("%s: no main landmark", page)
	}
	if roles["heading"] == 0 {
		t.Errorf("%s: no heading", page)
	}
}

// TestPagesReadAloud checks both pages through the accessibility tree a
// screen reader uses: every control, link, chart and gauge has a name, and
// each page has a main landmark and headings.
func TestPagesReadAloud(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	e.WaitTerminal(t, e.Submit(t, harness.JobBody("ann", "hello")).ID, 20*time.Second)
	ctx := browser.New(t, 90*time.Second)

	frag := url.Values{"key": {harness.TenantKey}, "user": {"ann"}, "model": {harness.Model}}
	must(t, chromedp.Do(ctx, chromedp.Navigate(e.API.URL+"/#"+frag.Encode()), chromedp.WaitVisible(chromedp.ID("msg"))))
	chat := axTree(t, ctx)
	checkNames(t, "chat page", chat)
	var msg bool
	for _, n := range chat {
		if n.role == "textbox" && strings.Contains(strings.ToLower(n.name), "message") {
			msg = true
		}
	}
	if !msg {
		t.Error("chat page: the message box is not announced as one")
	}

	must(t, chromedp.Do(ctx, asAdmin(harness.AdminKey), chromedp.Navigate(e.API.URL+"/dashboard"),
		chromedp.WaitReady(`body[data-loaded="1"]`), chromedp.WaitVisible(`[role="meter"]`)))
	dash := axTree(t, ctx)
	checkNames(t, "dashboard", dash)
	meters, images := 0, 0
	for _, n := range dash {
		switch n.role {
		case "meter":
			meters++
			if !strings.HasSuffix(n.name, "per minute in use") {
				t.Errorf("dashboard: a gauge is named %q", n.name)
			}
		case "image", "img":
			images++
		}
	}
	if meters != 3 || images != 4 {
		t.Errorf("dashboard: %d gauges and %d charts announced, want 3 and 4", meters, images)
	}
}
