package api_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/option"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

func classBody(user, class string) map[string]any {
	b := harness.JobBody(user, "hi")
	b["class"] = class
	return b
}

func TestJobClassField(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	if v := e.Submit(t, harness.JobBody("alice", "hi")); v.Class != "interactive" {
		t.Fatalf("default class %q", v.Class)
	}
	v := e.Submit(t, classBody("alice", "background"))
	if v.Class != "background" || e.Get(t, v.ID).Class != "background" {
		t.Fatalf("background job shows class %q, %q", v.Class, e.Get(t, v.ID).Class)
	}
	if v := e.Submit(t, classBody("alice", "interactive")); v.Class != "interactive" {
		t.Fatalf("interactive job shows class %q", v.Class)
	}
	page := scrape(t, e)
	for series, want := range map[string]float64{
		`sluice_queue_class_jobs{class="interactive",group="sonnet"}`: 2,
		`sluice_queue_class_jobs{class="background",group="sonnet"}`:  1,
		`sluice_queue_jobs{group="sonnet"}`:                           3,
	} {
		if got := metric(page, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	resp, b := e.Do(t, http.MethodGet, "/v1/admin/status", harness.AdminKey, nil)
	var st struct {
		Groups []struct {
			Queued           int64 `json:"queued"`
			QueuedBackground int64 `json:"queued_background"`
		} `json:"groups"`
	}
	if err := json.Unmarshal(b, &st); err != nil || resp.StatusCode != 200 || len(st.Groups) != 1 || st.Groups[0].Queued != 3 || st.Groups[0].QueuedBackground != 1 {
		t.Errorf("status: %d %s", resp.StatusCode, b)
	}
	for _, bad := range []any{"urgent", "Background", 5, true, map[string]any{}} {
		b := harness.JobBody("alice", "hi")
		b["class"] = bad
		resp, body := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, b)
		eb := decodeErr(t, body)
		if resp.StatusCode != 400 || eb.Error.Type != "invalid_request" || eb.Error.Field != "class" ||
			!strings.Contains(eb.Error.Message, `"interactive"`) || !strings.Contains(eb.Error.Message, `"background"`) {
			t.Errorf("class %v: %d %s", bad, resp.StatusCode, body)
		}
	}
}

func TestClassPolicy(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true,
		TenantExtra: "    classes: [interactive]\n    users:\n      batch: {classes: [background]}\n"})
	refused := func(body map[string]any, allowed string) {
		t.Helper()
		resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, body)
		var eb struct {
			Error struct {
				Type, Message, Field string
				Allowed              []string `json:"allowed_classes"`
			} `json:"error"`
		}
		_ = json.Unmarshal(b, &eb)
		if resp.StatusCode != 403 || eb.Error.Type != "permission_error" || eb.Error.Field != "class" ||
			!strings.Contains(eb.Error.Message, "allowed here: "+allowed+".") || strings.Join(eb.Error.Allowed, ",") != allowed {
			t.Fatalf("%v: %d %s", body, resp.StatusCode, b)
		}
	}
	refused(classBody("alice", "background"), "interactive")
	refused(harness.JobBody("batch", "hi"), "background") // the default class is interactive
	if v := e.Submit(t, classBody("batch", "background")); v.Class != "background" {
		t.Fatalf("batch's background job: %+v", v)
	}
	if v := e.Submit(t, harness.JobBody("alice", "hi")); v.Class != "interactive" {
		t.Fatalf("alice's job: %+v", v)
	}
}

func TestMessagesClassHeader(t *testing.T) {
	e := harness.Start(t, harness.Options{TenantExtra: "    users:\n      live: {classes: [interactive]}\n"})
	client := sdkClient(e)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := client.Messages.New(ctx, params("alice", "hi [[reply_tokens=3]]", 50), option.WithHeader("sluice-class", "background")); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Messages.New(ctx, params("bob", "hi [[reply_tokens=3]]", 50)); err != nil {
		t.Fatal(err)
	}
	classOf := func(user string) string {
		resp, b := e.Do(t, http.MethodGet, "/v1/jobs?user_id="+user, harness.TenantKey, nil)
		var p struct{ Jobs []jobs.View }
		if err := json.Unmarshal(b, &p); err != nil || resp.StatusCode != 200 || len(p.Jobs) != 1 {
			t.Fatalf("%s's jobs: %d %s", user, resp.StatusCode, b)
		}
		return p.Jobs[0].Class
	}
	if a, b := classOf("alice"), classOf("bob"); a != "background" || b != "interactive" {
		t.Fatalf("classes: alice %q, bob %q", a, b)
	}
	check := func(name string, err error, status int, typ, words string) {
		t.Helper()
		var ae *anthropic.Error
		if !errors.As(err, &ae) || ae.StatusCode != status || string(ae.Type()) != typ || !strings.Contains(ae.Message, words) {
			t.Fatalf("%s: %v, want %d %s saying %q", name, err, status, typ, words)
		}
	}
	_, err := client.Messages.New(ctx, params("alice", "hi", 50), option.WithHeader("sluice-class", "urgent"))
	check("bad class", err, 400, "invalid_request_error", "sluice-class")
	_, err = client.Messages.New(ctx, params("live", "hi", 50), option.WithHeader("sluice-class", "background"))
	check("forbidden class", err, 403, "permission_error", "allowed here: interactive.")
}

// End to end, through a worker and the fake upstream, one call at a time:
// a user's background backlog is running when the same user sends
// interactive jobs; they run next, before the rest of the backlog (fair
// queuing alone would put them behind the user's own earlier jobs).
func TestInteractiveJobsOvertakeABackgroundBacklog(t *testing.T) {
	e := harness.Start(t, harness.Options{MaxConcurrency: 1, Fake: fakeanthropic.Config{Latency: 150 * time.Millisecond}})
	var back, inter []string
	for range 8 {
		back = append(back, e.Submit(t, classBody("bulk", "background")).ID)
	}
	harness.Eventually(t, 20*time.Second, func() bool { return e.Get(t, back[0]).DispatchSeq > 0 }, "the first background job to be dispatched")
	for range 4 {
		inter = append(inter, e.Submit(t, classBody("bulk", "interactive")).ID)
	}
	var lastInteractive time.Time
	maxSeq := int64(0)
	for _, id := range inter {
		v := e.WaitTerminal(t, id, 30*time.Second)
		if v.Status != jobs.Succeeded || v.FinishedAt == nil {
			t.Fatalf("interactive job %+v", v)
		}
		maxSeq = max(maxSeq, v.DispatchSeq)
		if v.FinishedAt.After(lastInteractive) {
			lastInteractive = *v.FinishedAt
		}
	}
	before := 0 // background jobs dispatched before the last interactive one
	for _, id := range back {
		v := e.WaitTerminal(t, id, 30*time.Second)
		if v.Status != jobs.Succeeded {
			t.Fatalf("background job %+v", v)
		}
		if v.DispatchSeq < maxSeq {
			before++
			continue
		}
		if !v.FinishedAt.After(lastInteractive) {
			t.Errorf("background job %d (dispatched %d) finished at %v, before the last interactive job at %v", v.DispatchSeq, v.DispatchSeq, v.FinishedAt, lastInteractive)
		}
	}
	// The one running when they arrived, and at most one more that was
	// dispatched as it ended in the moment before they were admitted.
	if before > 2 {
		t.Fatalf("%d background jobs went before the last interactive one (dispatch %d)", before, maxSeq)
	}
}
