package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/internal/redistest"
)

// followed is one running job (its first event logged as "1-0") with a hub.
type followed struct {
	t     *testing.T
	rdb   *redis.Client
	hub   *Hub
	id    string
	sub   *Subscription
	ended chan error // what Follow returned
}

func follow(t *testing.T, idleEvery time.Duration, idle func() error, fn func(Event) (bool, error)) (*followed, context.CancelFunc) {
	t.Helper()
	rdb := redistest.Start(t).Client(t)
	hub := NewHub(NewStore(rdb, Options{}), slog.New(slog.NewTextHandler(io.Discard, nil)))
	t.Cleanup(func() { hub.Close() })
	f := &followed{t: t, rdb: rdb, hub: hub, id: "job_hubtest", ended: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := rdb.HSet(ctx, jobKey(f.id), "status", string(Running), "ev0_id", "1-0", "ev0", `{"position":1,"eta_seconds":0}`).Err(); err != nil {
		t.Fatal(err)
	}
	sub, err := hub.Subscribe(ctx, f.id)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Close)
	f.sub = sub
	go func() { f.ended <- sub.Follow(ctx, "", idleEvery, idle, fn) }()
	return f, cancel
}

// logged appends an event to the job's log (not published) and returns it.
func (f *followed) logged(name string, data string) Event {
	f.t.Helper()
	id, err := f.rdb.XAdd(context.Background(), &redis.XAddArgs{Stream: eventsKey(f.id), Values: []any{"event", name, "data", data}}).Result()
	if err != nil {
		f.t.Fatal(err)
	}
	return Event{ID: id, Name: name, Data: json.RawMessage(data)}
}

// live hands ev to the hub as if Redis had published it.
func (f *followed) live(ev Event) {
	b, _ := json.Marshal(ev)
	f.hub.dispatch(&redis.Message{Channel: channel(f.id), Payload: string(b)})
}

func (f *followed) end() error {
	f.t.Helper()
	select {
	case err := <-f.ended:
		return err
	case <-time.After(10 * time.Second):
		f.t.Fatal("Follow did not return")
		return nil
	}
}

func recv[T any](t *testing.T, c <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("no %s", what)
		var zero T
		return zero
	}
}

// Heartbeats come while nothing happens, pushed places get ids after the
// last event, and the end of the context ends Follow.
func TestFollowHeartbeatsPushesAndCancel(t *testing.T) {
	idles := make(chan struct{}, 100)
	got := make(chan Event, 100)
	f, cancel := follow(t, time.Millisecond,
		func() error {
			select {
			case idles <- struct{}{}:
			default:
			}
			return nil
		},
		func(ev Event) (bool, error) { got <- ev; return false, nil })
	if ev := recv(t, got, "first event"); ev.ID != "1-0" || ev.Name != "queued" {
		t.Fatalf("first event %+v", ev)
	}
	for range 3 {
		recv(t, idles, "heartbeat")
	}
	for i := 1; i <= 2; i++ {
		f.hub.Push(f.id, "queued", json.RawMessage(fmt.Sprintf(`{"position":%d}`, i)))
		if ev := recv(t, got, "pushed event"); ev.ID != fmt.Sprintf("1-0.%d", i) || ev.Name != "queued" {
			t.Fatalf("pushed event %d: %+v", i, ev)
		}
	}
	for range 3 {
		recv(t, idles, "heartbeat after events")
	}
	cancel()
	if err := f.end(); !errors.Is(err, context.Canceled) {
		t.Fatalf("Follow returned %v, want context.Canceled", err)
	}
	close(got)
	for ev := range got {
		t.Errorf("unexpected event %+v", ev) // a wake-up is never an event
	}
}

// Live events dropped because the follower fell behind are read from the
// log: every event is delivered once, in order.
func TestFollowResyncsAfterDroppedEvents(t *testing.T) {
	got := make(chan Event, 200)
	release := make(chan struct{})
	blocked := false
	f, _ := follow(t, time.Hour, func() error { return nil },
		func(ev Event) (bool, error) {
			got <- ev
			if ev.Name == "delta" && !blocked {
				blocked = true
				<-release // fall behind
			}
			return false, nil
		})
	recv(t, got, "first event")
	var want []Event
	first := f.logged("delta", `{"text":"0"}`)
	f.live(first)
	if ev := recv(t, got, "first delta"); ev.ID != first.ID {
		t.Fatalf("first delta %+v, want %+v", ev, first)
	}
	for i := 1; i <= 2*subscriptionBuffer; i++ {
		ev := f.logged("delta", fmt.Sprintf(`{"text":"%d"}`, i))
		want = append(want, ev)
		f.live(ev)
	}
	if !f.sub.resync.Load() {
		t.Fatal("a full buffer did not ask for a resync")
	}
	end := f.logged(string(Succeeded), `{}`) // in the log only
	want = append(want, end)
	close(release)
	if err := f.end(); err != nil {
		t.Fatalf("Follow returned %v", err)
	}
	close(got)
	var all []Event
	for ev := range got {
		all = append(all, ev)
	}
	if len(all) != len(want) {
		t.Fatalf("%d events after the first delta, want %d", len(all), len(want))
	}
	for i := range want {
		if all[i].ID != want[i].ID || all[i].Name != want[i].Name || string(all[i].Data) != string(want[i].Data) {
			t.Fatalf("event %d = %+v, want %+v", i, all[i], want[i])
		}
	}
}

// Closing the hub ends every Follow.
func TestFollowEndsWhenHubCloses(t *testing.T) {
	got := make(chan Event, 10)
	f, _ := follow(t, time.Hour, func() error { return nil }, func(ev Event) (bool, error) { got <- ev; return false, nil })
	recv(t, got, "first event")
	f.hub.Close()
	if err := f.end(); !errors.Is(err, ErrHubClosed) {
		t.Fatalf("Follow returned %v, want ErrHubClosed", err)
	}
}
