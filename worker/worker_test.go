package worker_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

const within = 20 * time.Second

func TestUpstream400FailsAtOnceWithReadableMessage(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	e.Fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultBadRequest})
	v := e.Submit(t, harness.JobBody("alice", "hi"))
	got := e.WaitTerminal(t, v.ID, within)
	if got.Status != jobs.Failed || got.Error == nil {
		t.Fatalf("job = %+v, want failed", got)
	}
	if got.Error.Type != "invalid_request" || !strings.Contains(got.Error.Message, "refused this request") {
		t.Fatalf("error = %+v", got.Error)
	}
	if n := e.Fake.Stats().Requests; n != 1 {
		t.Fatalf("upstream calls = %d, want exactly 1", n)
	}
	if got.Attempts != 1 {
		t.Fatalf("attempts = %d", got.Attempts)
	}
}

func TestFatalStatusesFailAtOnce(t *testing.T) {
	for _, kind := range []fakeanthropic.FaultKind{fakeanthropic.FaultSpendLimit} {
		t.Run(string(kind), func(t *testing.T) {
			e := harness.Start(t, harness.Options{})
			e.Fake.QueueFaults(fakeanthropic.FaultRule{Kind: kind})
			got := e.WaitTerminal(t, e.Submit(t, harness.JobBody("alice", "hi")).ID, within)
			if got.Status != jobs.Failed || got.Error.Type != "spend_limit" || !strings.Contains(got.Error.Message, "spend limit") {
				t.Fatalf("job = %+v %+v", got, got.Error)
			}
			if n := e.Fake.Stats().Requests; n != 1 {
				t.Fatalf("upstream calls = %d, want 1", n)
			}
		})
	}
}

func TestTransientFailuresAreRetried(t *testing.T) {
	for _, kind := range []fakeanthropic.FaultKind{
		fakeanthropic.FaultOverloaded, fakeanthropic.FaultAPIError, fakeanthropic.FaultTimeout,
		fakeanthropic.FaultStreamError, fakeanthropic.FaultDrop,
	} {
		t.Run(string(kind), func(t *testing.T) {
			e := harness.Start(t, harness.Options{})
			e.Fake.QueueFaults(fakeanthropic.FaultRule{Kind: kind})
			v := e.Submit(t, harness.JobBody("alice", "hi [[reply_tokens=5]]"))
			got := e.WaitTerminal(t, v.ID, within)
			if got.Status != jobs.Succeeded || got.Attempts != 2 {
				t.Fatalf("job status %s attempts %d, want succeeded after 2", got.Status, got.Attempts)
			}
			assertRetryingEvent(t, e, v.ID)
		})
	}
}

func TestStreamCutIsRetriedNeverPartialSuccess(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	e.Fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultStreamCut})
	v := e.Submit(t, harness.JobBody("alice", "hi [[reply_tokens=10]]"))
	got := e.WaitTerminal(t, v.ID, within)
	if got.Status != jobs.Succeeded || got.Attempts != 2 {
		t.Fatalf("status %s attempts %d", got.Status, got.Attempts)
	}
	if got.Usage.OutputTokens != 10 || len(strings.Fields(*got.Text)) != 10 {
		t.Fatalf("stored a partial answer: %q (usage %+v)", *got.Text, got.Usage)
	}
	if n := e.Fake.Stats().Requests; n != 2 {
		t.Fatalf("upstream calls = %d, want 2", n)
	}
}

func TestCutEveryTimeFailsAfterMaxAttempts(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	cut := fakeanthropic.FaultRule{Kind: fakeanthropic.FaultStreamCut}
	e.Fake.QueueFaults(cut, cut, cut)
	got := e.WaitTerminal(t, e.Submit(t, harness.JobBody("alice", "hi")).ID, within)
	if got.Status != jobs.Failed || got.Error.Type != "upstream_unavailable" || got.Text != nil {
		t.Fatalf("job = %+v", got)
	}
	if got.Attempts != e.Config.Upstream.MaxAttempts {
		t.Fatalf("attempts = %d, want %d", got.Attempts, e.Config.Upstream.MaxAttempts)
	}
}

func TestRateLimitRetryWaitsRetryAfterWithoutBurningAttempts(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	rl := fakeanthropic.FaultRule{Kind: fakeanthropic.FaultRateLimit, RetryAfter: time.Second}
	// More 429s than the job has attempts: rate limits must not use them up.
	e.Fake.QueueFaults(rl, rl, rl, rl)
	got := e.WaitTerminal(t, e.Submit(t, harness.JobBody("alice", "hi")).ID, within)
	if got.Status != jobs.Succeeded {
		t.Fatalf("job = %+v %+v", got, got.Error)
	}
	log := e.Fake.Stats().Log
	if len(log) != 5 {
		t.Fatalf("upstream calls = %d, want 5", len(log))
	}
	for i := 1; i < len(log); i++ {
		if gap := log[i].At.Sub(log[i-1].At); gap < time.Second {
			t.Fatalf("call %d came %s after a 429 with retry-after: 1; log %+v\n%s", i+1, gap, log, e.Logs())
		}
	}
}

func TestDeadlinePassedExpiresWithoutUpstreamCall(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	body := harness.JobBody("alice", "hi")
	body["deadline_seconds"] = 0.001
	v := e.Submit(t, body)
	// Start a worker only now, after the deadline has passed.
	e2 := harness.StartWorker(t, e)
	_ = e2
	got := e.WaitTerminal(t, v.ID, within)
	if got.Status != jobs.Expired || e.Fake.Stats().Requests != 0 {
		t.Fatalf("status %s after %d upstream calls", got.Status, e.Fake.Stats().Requests)
	}
}

func assertRetryingEvent(t *testing.T, e *harness.Env, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	evs := e.Events(t, ctx, id, harness.TenantKey, "")
	var names []string
	for _, ev := range evs {
		if ev.Event != "delta" {
			names = append(names, ev.Event)
		}
		if ev.Event == "retrying" {
			var d struct {
				Attempt        int     `json:"attempt"`
				Reason         string  `json:"reason"`
				RetryInSeconds float64 `json:"retry_in_seconds"`
			}
			if err := json.Unmarshal([]byte(ev.Data), &d); err != nil || d.Attempt != 1 || d.Reason == "" {
				t.Fatalf("retrying event %s", ev.Data)
			}
		}
	}
	want := "queued started retrying started succeeded"
	if strings.Join(names, " ") != want {
		t.Fatalf("events %v, want %s", names, want)
	}
}
