package api_test

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

func TestPositionChangesArePushed(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	a := e.Submit(t, harness.JobBody("u1", "hi"))
	b := e.Submit(t, harness.JobBody("u2", "hi"))
	c := e.Submit(t, harness.JobBody("u3", "hi"))
	if *c.Position != 3 {
		t.Fatalf("position %d", *c.Position)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.API.URL+"/v1/jobs/"+c.ID+"/events?token="+c.Token, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	type ev struct {
		id       string
		position int
	}
	events := make(chan ev, 16)
	go func() {
		defer close(events)
		sc := bufio.NewScanner(resp.Body)
		var id string
		var name string
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "id: "):
				id = line[4:]
			case strings.HasPrefix(line, "event: "):
				name = line[7:]
			case strings.HasPrefix(line, "data: ") && name == "queued":
				var d struct{ Position int }
				_ = json.Unmarshal([]byte(line[6:]), &d)
				events <- ev{id, d.Position}
			}
		}
	}()
	next := func(want int) ev {
		t.Helper()
		select {
		case got, ok := <-events:
			if !ok || got.position != want {
				t.Fatalf("queued event %+v (open %v), want position %d", got, ok, want)
			}
			return got
		case <-ctx.Done():
			t.Fatalf("no queued event with position %d", want)
		}
		return ev{}
	}
	first := next(3)
	for i, id := range []string{a.ID, b.ID} {
		if resp, body := e.Do(t, http.MethodDelete, "/v1/jobs/"+id, harness.TenantKey, nil); resp.StatusCode != 200 {
			t.Fatalf("cancel: %s", body)
		}
		got := next(2 - i)
		if got.id == "" || got.id == first.id {
			t.Fatalf("pushed event id %q", got.id)
		}
	}
	// A client reconnecting after the first event gets the current place at
	// once (places in line are pushed, not logged: only the latest counts).
	req, _ = http.NewRequestWithContext(ctx, http.MethodGet, e.API.URL+"/v1/jobs/"+c.ID+"/events", nil)
	req.Header.Set("x-api-key", harness.TenantKey)
	req.Header.Set("Last-Event-ID", first.id)
	resp2, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp2.Body.Close()
	replay := harness.ReadSSE(t, resp2.Body, 1)
	if len(replay) != 1 || replay[0].Event != "queued" || !strings.Contains(replay[0].Data, `"position":1`) || !strings.HasPrefix(replay[0].ID, first.id+".") {
		t.Fatalf("resumed after the first event: %+v", replay)
	}
}

func TestCancelOnDisconnect(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	v := e.Submit(t, harness.JobBody("alice", "hi"))
	open := func() (context.CancelFunc, chan struct{}) {
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.API.URL+"/v1/jobs/"+v.ID+"/events?cancel_on_disconnect=true&token="+v.Token, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan struct{})
		go func() {
			defer resp.Body.Close()
			harness.ReadSSE(t, resp.Body, 1) // the queued event
			close(got)
			_, _ = io.Copy(io.Discard, resp.Body)
		}()
		<-got
		return cancel, got
	}
	first, _ := open()
	second, _ := open()
	first()
	// One follower is still there: once the first has been counted out, the
	// job is still queued.
	harness.Eventually(t, 10*time.Second, func() bool {
		n, _ := e.RDB.ZCard(context.Background(), jobs.FollowersKey(v.ID)).Result()
		return n == 1
	}, "the first follower to be counted out")
	if st := e.Get(t, v.ID).Status; st != "queued" {
		t.Fatalf("status %s while a follower remains", st)
	}
	second()
	harness.Eventually(t, 10*time.Second, func() bool { return e.Get(t, v.ID).Status == "canceled" }, "the cancel on the last disconnect")
	// It leaves its lane just after the status changes.
	harness.Eventually(t, 10*time.Second, func() bool {
		n, _ := e.Sched.QueueLength(context.Background(), "sonnet")
		return n == 0
	}, "the canceled job to leave the queue")
}

// A client that drops after k events and reconnects to another api process
// with Last-Event-ID gets every later event exactly once, live and after
// the end.
func TestResumeAcrossAPIProcesses(t *testing.T) {
	e := harness.Start(t, harness.Options{Fake: fakeanthropic.Config{TokensPerSecond: 40}})
	other := harness.StartAPI(t, e)
	v := e.Submit(t, harness.JobBody("alice", "tell me [[reply_tokens=30]]"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	open := func(base, last string) *http.Response {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/jobs/"+v.ID+"/events", nil)
		req.Header.Set("x-api-key", harness.TenantKey)
		if last != "" {
			req.Header.Set("Last-Event-ID", last)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	// Live: 5 events from the first process (the answer is still being
	// written: 30 tokens at 40 a second), drop, resume on the other.
	resp := open(e.API.URL, "")
	head := harness.ReadSSE(t, resp.Body, 5)
	resp.Body.Close()
	if len(head) != 5 || head[4].Event == "succeeded" {
		t.Fatalf("first 5 events: %+v", head)
	}
	resp = open(other.URL, head[4].ID)
	tail := harness.ReadSSE(t, resp.Body, -1)
	resp.Body.Close()
	all := e.Events(t, ctx, v.ID, harness.TenantKey, "")
	if diff := len(all) - 5 - len(tail); diff != 0 || all[len(all)-1].Event != "succeeded" {
		t.Fatalf("resumed live: %d events after 5, want %d", len(tail), len(all)-5)
	}
	for i, ev := range tail {
		if ev != all[5+i] {
			t.Fatalf("resumed live: event %d = %+v, want %+v", i, ev, all[5+i])
		}
	}
	// After the end, from any point.
	for _, k := range []int{1, len(all) / 2, len(all) - 1} {
		resp := open(other.URL, all[k-1].ID)
		rest := harness.ReadSSE(t, resp.Body, -1)
		resp.Body.Close()
		if len(rest) != len(all)-k {
			t.Fatalf("after %d events: %d more, want %d", k, len(rest), len(all)-k)
		}
		for i, ev := range rest {
			if ev != all[k+i] {
				t.Fatalf("after %d events: event %d = %+v, want %+v", k, i, ev, all[k+i])
			}
		}
	}
}

// TestDispatchPushesPositionsAtOnce: with the periodic read an hour away,
// a dispatch (and a cancel) still reach the followers of the jobs behind,
// through the queue's "moved" announcement.
func TestDispatchPushesPositionsAtOnce(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, PositionEvery: time.Hour})
	var vs []jobs.View
	for _, u := range []string{"u1", "u2", "u3", "u4"} {
		vs = append(vs, e.Submit(t, harness.JobBody(u, "hi")))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.API.URL+"/v1/jobs/"+vs[3].ID+"/events?token="+vs[3].Token, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	if evs := harness.ReadSSE(t, r, 1); !strings.Contains(evs[0].Data, `"position":4`) {
		t.Fatalf("first event %+v", evs)
	}
	res, err := e.Sched.Dispatch(ctx, &e.Config.ModelGroups[0], 1)
	if err != nil || len(res.Jobs) != 1 {
		t.Fatalf("dispatch: %+v %v", res, err)
	}
	if evs := harness.ReadSSE(t, r, 1); len(evs) != 1 || !strings.Contains(evs[0].Data, `"position":3`) {
		t.Fatalf("after a dispatch: %+v", evs)
	}
	if resp, body := e.Do(t, http.MethodDelete, "/v1/jobs/"+vs[1].ID, harness.TenantKey, nil); resp.StatusCode != 200 {
		t.Fatalf("cancel: %s", body)
	}
	if evs := harness.ReadSSE(t, r, 1); len(evs) != 1 || !strings.Contains(evs[0].Data, `"position":2`) {
		t.Fatalf("after a cancel: %+v", evs)
	}
}

// TestPeriodicReadPushesUnannouncedMoves: a place that changes without a
// queue announcing a move (another user's job admitted ahead in the fair
// order) still reaches the follower, through the periodic read.
func TestPeriodicReadPushesUnannouncedMoves(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, PositionEvery: 20 * time.Millisecond})
	e.Submit(t, harness.JobBody("u1", "hi"))
	v := e.Submit(t, harness.JobBody("u1", "hi"))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.API.URL+"/v1/jobs/"+v.ID+"/events?token="+v.Token, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	if evs := harness.ReadSSE(t, r, 1); !strings.Contains(evs[0].Data, `"position":2`) {
		t.Fatalf("first event %+v", evs)
	}
	if w := e.Submit(t, harness.JobBody("u2", "hi")); *w.Position != 2 {
		t.Fatalf("u2's job at %d, want 2 (ahead of u1's second)", *w.Position)
	}
	if evs := harness.ReadSSE(t, r, 1); len(evs) != 1 || !strings.Contains(evs[0].Data, `"position":3`) {
		t.Fatalf("after a job was admitted ahead: %+v", evs)
	}
}
