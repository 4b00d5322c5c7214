package web_test

import (
	"context"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/browser"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/scheduler"
)

// TestWaitingView drives the chat page's waiting view, the screen the
// people in line look at. Three jobs wait ahead and the group is frozen
// for a while (an upstream 429), so the message has a real wait:
//
//   - at 1280x800, 390x844 and 360x740 the place in line and a countdown are
//     large, visible and centred, and nothing runs off the side;
//   - the countdown ticks while the polite live region stays quiet, and a
//     new place is spoken at most every few seconds while the big figure
//     follows every move;
//   - the progress line counts the messages ahead that have gone;
//   - the user's quota for the hour and the fake-upstream note show;
//   - the words change to "Claude is writing…" when the answer starts and
//     to "Trying again…" when an attempt is cut off and retried.
//
// Screenshots of both sizes are saved.
func TestWaitingView(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true,
		TenantExtra: "    requests_per_hour: 20\n    tokens_per_hour: 100000\n",
		// Slow enough that "Claude is writing…" is on screen a while.
		Fake: fakeanthropic.Config{TokensPerSecond: 10, Latency: 300 * time.Millisecond}})
	var ahead []string
	for _, u := range []string{"ann", "bob", "cy"} {
		ahead = append(ahead, e.Submit(t, harness.JobBody(u, "first in line")).ID)
	}
	if _, err := e.Sched.Freeze(context.Background(), &e.Config.ModelGroups[0], scheduler.Pushback429, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	ctx := browser.New(t, 120*time.Second)
	must(t, chromedp.Do(ctx, chromedp.EmulateViewport(1280, 800)))
	open(t, ctx, e, "student-1")
	recordLiveRegion(t, ctx)
	send(t, ctx, "What is a token bucket?")

	waitText(t, ctx, "#place", "#4")
	waitJS(t, ctx, `document.getElementById("turn").dataset.phase === "queued"`, "the waiting view")
	checkBigAndCentred(t, ctx, "desktop", 56)
	if eta := eval[string](t, ctx, `document.getElementById("countdown").textContent`); !regexp.MustCompile(`^\d+:\d\d$`).MatchString(eta) {
		t.Errorf("the countdown shows %q, want m:ss", eta)
	}
	spoken := eval[string](t, ctx, `document.getElementById("status").textContent`)
	if !regexp.MustCompile(`^You're #4 in line, about \d+ seconds\.$`).MatchString(spoken) {
		t.Errorf("the live region says %q, want the place and the wait", spoken)
	}
	if n := eval[int](t, ctx, `document.querySelectorAll("[aria-live], [role=status], [role=alert], [role=log]").length`); n != 1 {
		t.Errorf("%d live regions on the chat page, want one", n)
	}
	if live := eval[string](t, ctx, `document.getElementById("status").getAttribute("aria-live")`); live != "polite" {
		t.Errorf("the live region is %q, want polite", live)
	}

	// The countdown ticks; the live region does not.
	before := len(spokenLog(t, ctx))
	first := countdownSeconds(t, ctx)
	waitJS(t, ctx, `(() => { const m = /^(\d+):(\d\d)$/.exec(document.getElementById("countdown").textContent);
		return !!m && +m[1] * 60 + +m[2] <= `+strconv.Itoa(first-3)+`; })()`, "the countdown to tick three times")
	if got := spokenLog(t, ctx); len(got) != before {
		t.Errorf("the live region changed while the countdown ticked: %q", texts(got[before:]))
	}

	// The quota for the hour, and the note that the answers are made up.
	if q := waitText(t, ctx, "#quota", "left this hour"); !strings.Contains(q, "19 of 20 messages") || !strings.Contains(q, "of 100,000 tokens") {
		t.Errorf("the quota says %q, want 19 of 20 messages and the tokens", q)
	}
	if eval[bool](t, ctx, `document.getElementById("fake-note").hidden`) {
		t.Error("no note that the answers come from the fake upstream")
	} else if note := eval[string](t, ctx, `document.getElementById("fake-note").textContent`); !strings.Contains(note, "fake") {
		t.Errorf("the fake-upstream note says %q", note)
	}
	shoot(t, ctx, "chat-waiting-desktop.png")

	// The line moves: the big figure follows each move, the progress line
	// counts the messages gone, the live region speaks sparingly.
	for i, id := range ahead {
		if resp, b := e.Do(t, http.MethodDelete, "/v1/jobs/"+id, harness.TenantKey, nil); resp.StatusCode != http.StatusOK {
			t.Fatalf("cancel %s: %d %s", id, resp.StatusCode, b)
		}
		waitText(t, ctx, "#place", "#"+strconv.Itoa(3-i))
	}
	if p := waitText(t, ctx, "#progress-text", "3 of the 3"); p != "3 of the 3 messages ahead of yours have gone to Claude." {
		t.Errorf("the progress line says %q", p)
	}
	if w := eval[string](t, ctx, `document.getElementById("progress-fill").style.width`); w != "100%" {
		t.Errorf("the progress bar is %s wide with no one left ahead", w)
	}
	waitText(t, ctx, "#phase", "You're next")
	waitText(t, ctx, "#status", "You're next in line")
	checkSpokenSparingly(t, spokenLog(t, ctx))

	// On a phone, after a reload: the same view, followed again.
	must(t, chromedp.Do(ctx, chromedp.EmulateViewport(390, 844, chromedp.EmulateMobile, chromedp.EmulateTouch),
		chromedp.Reload(), chromedp.WaitVisible(chromedp.ID("msg"))))
	recordLiveRegion(t, ctx)
	waitText(t, ctx, "#place", "#1")
	waitJS(t, ctx, `document.getElementById("turn").dataset.phase === "queued"`, "the waiting view after the reload")
	waitText(t, ctx, "#quota", "left this hour")
	checkBigAndCentred(t, ctx, "phone", 44)
	waitJS(t, ctx, `(() => { const f = document.getElementById("progress-fill");
		return f.getBoundingClientRect().width >= f.parentNode.getBoundingClientRect().width - 1; })()`, "the progress bar to fill")
	if p := eval[string](t, ctx, `document.getElementById("progress-text").textContent`); !strings.HasPrefix(p, "3 of the 3") {
		t.Errorf("after the reload the progress line says %q, want it counted from the first place seen", p)
	}
	shoot(t, ctx, "chat-waiting-phone.png")
	// The narrowest phones: 360 px.
	must(t, chromedp.Do(ctx, chromedp.EmulateViewport(360, 740, chromedp.EmulateMobile, chromedp.EmulateTouch)))
	eval[bool](t, ctx, `(document.getElementById("wait").scrollIntoView({ block: "center" }), true)`)
	checkBigAndCentred(t, ctx, "360 px phone", 44)
	shoot(t, ctx, "chat-waiting-360.png")

	// The answer starts: the words say so. Its first attempt is cut off
	// mid-stream, so it is retried and the words say that too.
	recordPhases(t, ctx)
	e.Fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultStreamCut})
	harness.StartWorker(t, e)
	waitText(t, ctx, "#phase", "Claude is writing…")
	if step := eval[string](t, ctx, `document.querySelector('#steps [aria-current="step"]').dataset.step`); step != "writing" {
		t.Errorf("the steps show %q as current while Claude writes", step)
	}
	if !eval[bool](t, ctx, `document.getElementById("wait").hidden`) {
		t.Error("the place in line is still shown while Claude writes")
	}
	shoot(t, ctx, "chat-writing-phone.png")
	waitText(t, ctx, "#status", "Answer complete.")
	phases := eval[[]string](t, ctx, `window.phases`)
	var retried bool
	for _, p := range phases {
		if strings.HasPrefix(p, "retrying: ") && strings.Contains(p, "Trying again") {
			retried = true
		}
	}
	if !retried {
		t.Errorf("the phases shown were %q, want a retry saying \"Trying again\"", phases)
	}
	if !containsPrefix(phases, "writing: Claude is writing…") {
		t.Errorf("the phases shown were %q, want \"Claude is writing…\"", phases)
	}
	said := spokenLog(t, ctx)
	if !containsPrefix(texts(said), "Claude is writing…") {
		t.Errorf("the live region said %q, never that Claude is writing", texts(said))
	}
	if eval[string](t, ctx, `document.getElementById("turn").dataset.phase`) != "idle" || !eval[bool](t, ctx, `document.getElementById("cancel").hidden`) {
		t.Error("the waiting view stays after the answer")
	}
	if shown := eval[[]string](t, ctx, `[...document.querySelectorAll("#turn > *")].filter(n => n.getClientRects().length && n.id !== "quota" && !n.classList.contains("sr")).map(n => n.id || n.className)`); len(shown) > 0 {
		t.Errorf("after the answer the waiting view still shows %q", shown)
	}
	if n := eval[int](t, ctx, `document.querySelectorAll("#conversation li.model").length`); n != 1 {
		t.Errorf("%d answers on the page, want 1", n)
	}
}

// spoken is one change of the live region: when (ms, page clock) and what.
type spoken struct {
	At   float64 `json:"at"`
	Text string  `json:"text"`
}

// recordLiveRegion keeps every text the live region takes, with its time,
// in window.spoken (kept across reloads in sessionStorage).
func recordLiveRegion(t *testing.T, ctx context.Context) {
	t.Helper()
	eval[bool](t, ctx, `(() => {
		const install = () => {
			window.spoken = JSON.parse(sessionStorage.getItem("test.spoken") || "[]");
			const s = document.getElementById("status");
			new MutationObserver(() => {
				window.spoken.push({ at: Date.now(), text: s.textContent });
				sessionStorage.setItem("test.spoken", JSON.stringify(window.spoken));
			}).observe(s, { childList: true, characterData: true, subtree: true });
		};
		install();
		return true;
	})()`)
}

func spokenLog(t *testing.T, ctx context.Context) []spoken {
	t.Helper()
	return eval[[]spoken](t, ctx, `window.spoken || []`)
}

func texts(s []spoken) []string {
	var out []string
	for _, x := range s {
		out = append(out, x.Text)
	}
	return out
}

// checkSpokenSparingly: places are spoken at most every 10 s, becoming
// next at most 3 s after the last place, and the countdown never.
func checkSpokenSparingly(t *testing.T, said []spoken) {
	t.Helper()
	var places []spoken
	for _, s := range said {
		if regexp.MustCompile(`\d+:\d\d`).MatchString(s.Text) {
			t.Errorf("the live region read out a countdown: %q", s.Text)
		}
		if strings.Contains(s.Text, "in line") {
			places = append(places, s)
		}
	}
	if len(places) == 0 {
		t.Fatalf("no place in line was spoken: %q", texts(said))
	}
	for i := 1; i < len(places); i++ {
		gap := places[i].At - places[i-1].At
		min := 9900.0
		if strings.Contains(places[i].Text, "next") {
			min = 2900
		}
		if gap < min {
			t.Errorf("%q was spoken %.0f ms after %q", places[i].Text, gap, places[i-1].Text)
		}
	}
	// The line moved three times within a few seconds: the big figure
	// showed each place, the live region far fewer.
	if len(places) > 3 {
		t.Errorf("the live region spoke %d places: %q", len(places), texts(places))
	}
}

// recordPhases keeps each phase the waiting view shows, with its words, in
// window.phases.
func recordPhases(t *testing.T, ctx context.Context) {
	t.Helper()
	eval[bool](t, ctx, `(() => {
		window.phases = [];
		const turn = document.getElementById("turn"), phase = document.getElementById("phase");
		const note = () => {
			const p = turn.dataset.phase + ": " + phase.textContent;
			if (window.phases[window.phases.length - 1] !== p) window.phases.push(p);
		};
		new MutationObserver(note).observe(turn, { attributes: true, childList: true, characterData: true, subtree: true });
		note();
		return true;
	})()`)
}

// checkBigAndCentred: the place and the countdown are at least minPx
// tall, inside the viewport, centred across it, in its middle band from
// top to bottom, and the page does not scroll sideways.
func checkBigAndCentred(t *testing.T, ctx context.Context, size string, minPx float64) {
	t.Helper()
	type box struct {
		Left, Right, Top, Bottom, Font, VW, VH, ScrollW float64
	}
	measure := func(sel string) box {
		return eval[box](t, ctx, `(() => {
			const n = document.querySelector(`+quote(sel)+`), r = n.getBoundingClientRect();
			return { Left: r.left, Right: r.right, Top: r.top, Bottom: r.bottom, Font: parseFloat(getComputedStyle(n).fontSize),
				VW: document.documentElement.clientWidth, VH: window.innerHeight, ScrollW: document.documentElement.scrollWidth };
		})()`)
	}
	place, eta := measure("#place"), measure("#countdown")
	for name, b := range map[string]box{"place": place, "countdown": eta} {
		if b.Font < minPx {
			t.Errorf("%s: the %s is %.0f px, want at least %.0f", size, name, b.Font, minPx)
		}
		if b.Left < 0 || b.Right > b.VW || b.Top < 0 || b.Bottom > b.VH {
			t.Errorf("%s: the %s (%+v) is not wholly in the %.0fx%.0f viewport", size, name, b, b.VW, b.VH)
		}
	}
	left, right := min(place.Left, eta.Left), max(place.Right, eta.Right)
	if mid := (left + right) / 2; mid < place.VW/2-place.VW*0.03 || mid > place.VW/2+place.VW*0.03 {
		t.Errorf("%s: the place and countdown are centred at x=%.0f, the viewport's centre is %.0f", size, mid, place.VW/2)
	}
	top, bottom := min(place.Top, eta.Top), max(place.Bottom, eta.Bottom)
	if mid := (top + bottom) / 2; mid < place.VH*0.2 || mid > place.VH*0.8 {
		t.Errorf("%s: the place and countdown are at y=%.0f of %.0f, not in the middle of the screen", size, mid, place.VH)
	}
	if place.ScrollW > place.VW+1 {
		t.Errorf("%s: the page is %.0f px wide in a %.0f px viewport: it scrolls sideways", size, place.ScrollW, place.VW)
	}
}

func countdownSeconds(t *testing.T, ctx context.Context) int {
	t.Helper()
	return eval[int](t, ctx, `(() => { const m = /^(\d+):(\d\d)$/.exec(document.getElementById("countdown").textContent); return m ? +m[1] * 60 + +m[2] : -1; })()`)
}

// waitJS waits until the expression is true.
func waitJS(t *testing.T, ctx context.Context, js, what string) {
	t.Helper()
	_, err := chromedp.Run(ctx, chromedp.Poll[bool](js, chromedp.WithPollingTimeout(30*time.Second), chromedp.WithPollingInterval(20*time.Millisecond)))
	if err != nil {
		now, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body.innerText`))
		t.Fatalf("waiting for %s: %v\npage:\n%s", what, err, now)
	}
}

func shoot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	must(t, err)
	path := browser.ArtifactPath(t, name)
	must(t, os.WriteFile(path, png, 0o644))
	t.Logf("screenshot: %s", path)
}

func containsPrefix(list []string, prefix string) bool {
	for _, x := range list {
		if strings.HasPrefix(x, prefix) {
			return true
		}
	}
	return false
}
