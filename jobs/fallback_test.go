package jobs_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
)

// A job that fell back keeps the model asked for, the group that refused
// it and why in its record; its view shows requested_model and
// fallback_reason, and its first queued event adds them with fallback_from.
// A job that did not fall back shows none of them.
func TestFallbackFieldsAndFirstEvent(t *testing.T) {
	ctx := context.Background()
	rdb := redistest.Start(t).Client(t)
	store := jobs.NewStore(rdb, jobs.Options{})
	write := func(j *jobs.Job) {
		t.Helper()
		fields := append(store.Fields(j), "ev0_id", "1-0", "ev0", `{"position":2,"eta_seconds":7}`)
		if err := rdb.HSet(ctx, jobs.Key(j.ID), fields...).Err(); err != nil {
			t.Fatal(err)
		}
	}
	fell := &jobs.Job{ID: jobs.NewID("haiku"), Tenant: "acme", UserID: "alice", Model: "claude-haiku-4-5", Group: "haiku",
		RequestedModel: "claude-sonnet-4-6", FallbackFrom: "sonnet", FallbackReason: "on_wait",
		MaxTokens: 10, Request: json.RawMessage(`{}`), CreatedAt: time.Now()}
	plain := &jobs.Job{ID: jobs.NewID("sonnet"), Tenant: "acme", UserID: "alice", Model: "claude-sonnet-4-6", Group: "sonnet",
		MaxTokens: 10, Request: json.RawMessage(`{}`), CreatedAt: time.Now()}
	write(fell)
	write(plain)

	got, err := store.Get(ctx, fell.ID)
	if err != nil || got.RequestedModel != "claude-sonnet-4-6" || got.FallbackFrom != "sonnet" || got.FallbackReason != "on_wait" {
		t.Fatalf("stored: %+v %v", got, err)
	}
	b, _ := json.Marshal(got.View())
	if !strings.Contains(string(b), `"model":"claude-haiku-4-5","requested_model":"claude-sonnet-4-6","fallback_reason":"on_wait"`) {
		t.Errorf("view: %s", b)
	}
	evs, err := store.Events(ctx, fell.ID, "", 10)
	if err != nil || len(evs) != 1 {
		t.Fatalf("events: %+v %v", evs, err)
	}
	var data map[string]any
	if err := json.Unmarshal(evs[0].Data, &data); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"position": 2.0, "eta_seconds": 7.0, "requested_model": "claude-sonnet-4-6", "fallback_from": "sonnet", "fallback_reason": "on_wait"}
	if diff := cmp.Diff(want, data); diff != "" {
		t.Errorf("queued event (-want +got):\n%s", diff)
	}

	got, _ = store.Get(ctx, plain.ID)
	if b, _ := json.Marshal(got.View()); strings.Contains(string(b), "requested_model") || strings.Contains(string(b), "fallback") {
		t.Errorf("a job that did not fall back: %s", b)
	}
	if evs, _ := store.Events(ctx, plain.ID, "", 10); len(evs) != 1 || string(evs[0].Data) != `{"position":2,"eta_seconds":7}` {
		t.Errorf("its queued event is not as admission wrote it: %+v", evs)
	}
}
