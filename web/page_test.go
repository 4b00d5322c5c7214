package web_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/sluice-dev/sluice/internal/browser"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

// TestChatPage drives the demo page in headless Chromium: the message
// waits behind three others and the page shows "#4 in line"; a worker
// starts and the answer appears, word for word what the job recorded; a
// second message is over the user's hourly quota and the page shows
// sluice's own sentence, not a status code.
func TestChatPage(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, TenantExtra: "    requests_per_hour: 1\n"})
	for _, u := range []string{"ann", "bob", "cy"} {
		e.Submit(t, harness.JobBody(u, "first in line"))
	}
	ctx := browser.New(t, 90*time.Second)

	open(t, ctx, e, "student-1")
	settingsOpen := eval[bool](t, ctx, `document.getElementById("settings").open`)
	if settingsOpen {
		t.Error("the settings stay open although the link filled in the key")
	}
	send(t, ctx, "What is a token bucket?")
	status := waitText(t, ctx, "#status", "#4 in line")
	if !regexp.MustCompile(`^You're #4 in line, (about \d+ (seconds|minutes)|starting any moment)\.$`).MatchString(status) {
		t.Errorf("status %q: want the place and the time estimate", status)
	}
	if eval[bool](t, ctx, `document.getElementById("cancel").hidden`) {
		t.Error("no cancel button while the message waits")
	}
	if eval[string](t, ctx, `document.getElementById("status").getAttribute("aria-live")`) != "polite" {
		t.Error("the status line is not announced to screen readers")
	}

	harness.StartWorker(t, e)
	waitText(t, ctx, "#status", "Answer complete.")
	answer := eval[string](t, ctx, `document.querySelector("#conversation li.model .text").textContent`)
	mine := onlyJob(t, e, "student-1")
	if mine.Status != jobs.Succeeded || mine.Text == nil || *mine.Text == "" {
		t.Fatalf("the page's job: %+v", mine)
	}
	if answer != *mine.Text {
		t.Errorf("the page shows %q, the job's answer is %q", answer, *mine.Text)
	}

	send(t, ctx, "And a leaky bucket?")
	note := waitText(t, ctx, "#conversation li.note .text", "You've used your 1 request for this hour")
	for _, raw := range []string{"429", "UTC", "rate_limit", "error"} {
		if strings.Contains(note, raw) {
			t.Errorf("the refusal %q shows %q", note, raw)
		}
	}
	if eval[bool](t, ctx, `document.getElementById("send").disabled`) {
		t.Error("the send button stays disabled after a refusal")
	}
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	must(t, err)
	shot := browser.ArtifactPath(t, "chat-page.png")
	must(t, os.WriteFile(shot, png, 0o644))
	t.Logf("screenshot: %s", shot)
}

// TestChatPageKeepsConversation: the second message carries the first turn
// and its answer, and a reload keeps the conversation on screen.
func TestChatPageKeepsConversation(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	ctx := browser.New(t, 90*time.Second)
	open(t, ctx, e, "student-2")
	send(t, ctx, "one")
	waitText(t, ctx, "#status", "Answer complete.")
	send(t, ctx, "two")
	waitText(t, ctx, "#status", "Answer complete.")

	list := listJobs(t, e, "student-2")
	if len(list) != 2 {
		t.Fatalf("%d jobs, want 2", len(list))
	}
	// The newest job (listed first) carried the whole conversation.
	second, err := e.Store.Get(context.Background(), list[0].ID)
	must(t, err)
	var req struct {
		Messages []struct {
			Role    string `json:"role"`
			Content any    `json:"content"`
		} `json:"messages"`
	}
	must(t, json.Unmarshal(second.Request, &req))
	if len(req.Messages) != 3 || req.Messages[0].Content != "one" || req.Messages[1].Role != "assistant" || req.Messages[2].Content != "two" {
		t.Errorf("the second message was sent with %+v, want one, the answer, two", req.Messages)
	}

	must(t, chromedp.Do(ctx, chromedp.Reload(), chromedp.WaitVisible(chromedp.ID("msg"))))
	if n := eval[int](t, ctx, `document.querySelectorAll("#conversation li").length`); n != 4 {
		t.Errorf("after a reload the page shows %d turns, want 4", n)
	}
}

// TestChatPageFollowsAfterReload: a reply still waiting when the page
// reloads is followed again and its answer appears.
func TestChatPageFollowsAfterReload(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	e.Submit(t, harness.JobBody("ann", "first in line"))
	ctx := browser.New(t, 90*time.Second)
	open(t, ctx, e, "student-3")
	send(t, ctx, "hello")
	waitText(t, ctx, "#status", "#2 in line")
	must(t, chromedp.Do(ctx, chromedp.Reload(), chromedp.WaitVisible(chromedp.ID("msg"))))
	waitText(t, ctx, "#status", "#2 in line")
	harness.StartWorker(t, e)
	waitText(t, ctx, "#status", "Answer complete.")
	if n := eval[int](t, ctx, `document.querySelectorAll("#conversation li.model").length`); n != 1 {
		t.Errorf("%d answers on the page, want 1", n)
	}
}

func open(t *testing.T, ctx context.Context, e *harness.Env, user string) {
	t.Helper()
	frag := url.Values{"key": {harness.TenantKey}, "user": {user}, "model": {harness.Model}}
	must(t, chromedp.Do(ctx,
		chromedp.Navigate(e.API.URL+"/#"+frag.Encode()),
		chromedp.WaitVisible(chromedp.ID("msg")),
	))
}

func send(t *testing.T, ctx context.Context, text string) {
	t.Helper()
	must(t, chromedp.Do(ctx,
		chromedp.WaitEnabled(chromedp.ID("send")),
		chromedp.SetValue(chromedp.ID("msg"), text),
		chromedp.Click(chromedp.ID("send")),
	))
}

func eval[T any](t *testing.T, ctx context.Context, js string) T {
	t.Helper()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](js))
	if err != nil {
		t.Fatalf("%s: %v", js, err)
	}
	return v
}

// waitText waits until the element's text contains want, and returns it.
func waitText(t *testing.T, ctx context.Context, sel, want string) string {
	t.Helper()
	js := `(() => { const n = document.querySelector(` + quote(sel) + `); return n && n.textContent.includes(` + quote(want) + `) ? n.textContent : ""; })()`
	got, err := chromedp.Run(ctx, chromedp.Poll[string](js, chromedp.WithPollingTimeout(30*time.Second), chromedp.WithPollingInterval(20*time.Millisecond)))
	if err != nil {
		now, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body.innerText`))
		t.Fatalf("waiting for %s to say %q: %v\npage:\n%s", sel, want, err, now)
	}
	return got
}

func quote(s string) string { b, _ := json.Marshal(s); return string(b) }

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func listJobs(t *testing.T, e *harness.Env, user string) []jobs.View {
	t.Helper()
	resp, b := e.Do(t, http.MethodGet, "/v1/jobs?user_id="+user, harness.TenantKey, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("list: %d %s", resp.StatusCode, b)
	}
	var out struct {
		Jobs []jobs.View `json:"jobs"`
	}
	must(t, json.Unmarshal(b, &out))
	return out.Jobs
}

func onlyJob(t *testing.T, e *harness.Env, user string) jobs.View {
	t.Helper()
	list := listJobs(t, e, user)
	if len(list) != 1 {
		t.Fatalf("%d jobs for %s, want 1", len(list), user)
	}
	return e.Get(t, list[0].ID)
}

// TestChatPageFromACredentialsURL: opened as http://user:pass@host/, the
// page still reaches the API (a fetch of a URL with credentials throws)
// and the answer arrives.
func TestChatPageFromACredentialsURL(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	ctx := browser.New(t, 90*time.Second)
	frag := url.Values{"key": {harness.TenantKey}, "user": {"student-1"}, "model": {harness.Model}}
	u := strings.Replace(e.API.URL, "http://", "http://student:secret@", 1) + "/#" + frag.Encode()
	must(t, chromedp.Do(ctx, chromedp.Navigate(u), chromedp.WaitVisible(chromedp.ID("msg"))))
	send(t, ctx, "What is a token bucket?")
	waitText(t, ctx, "#status", "Answer complete.")
	mine := onlyJob(t, e, "student-1")
	if mine.Status != jobs.Succeeded || mine.Text == nil {
		t.Fatalf("the page's job: %+v", mine)
	}
	if answer := eval[string](t, ctx, `document.querySelector("#conversation li.model .text").textContent`); answer != *mine.Text {
		t.Errorf("the page shows %q, the job's answer is %q", answer, *mine.Text)
	}
}
