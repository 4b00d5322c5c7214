package main

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

// A killed api's followers stop counting once their leases end, so a job
// whose followers asked for cancel_on_disconnect is canceled (once) when
// the next follower, on another api, leaves.
func TestKilledAPIsFollowersStopCounting(t *testing.T) {
	c := startCluster(t, fakeanthropic.Group{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 100, InputTPM: 100000, OutputTPM: 100000},
		2, fakeanthropic.Config{}, "api:\n  follower_lease: 2s\n") // no worker: the job stays queued
	v := c.submit(t, "alice", "wait for me", 50)

	follow := func(base string) context.CancelFunc {
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/jobs/"+v.ID+"/events?cancel_on_disconnect=true&token="+v.Token, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan struct{})
		go func() {
			defer resp.Body.Close()
			harness.ReadSSE(t, resp.Body, 1) // the queued event: the follower is counted
			close(got)
			buf := make([]byte, 512)
			for {
				if _, err := resp.Body.Read(buf); err != nil {
					return
				}
			}
		}()
		<-got
		return cancel
	}
	for range 3 {
		follow(c.api)
	}
	c.apiProc.Kill(t)

	second := c.start(t, "api").baseURL(t)
	// Each follower that leaves while the dead api's leases last leaves
	// others behind; the first to leave after they ran out cancels the job.
	harness.Eventually(t, 20*time.Second, func() bool {
		follow(second)()
		return c.getFrom(t, second, v.ID).Status == jobs.Canceled
	}, "a follower leaving after the killed api's leases ran out to cancel the job")

	evs := c.eventsFrom(t, second, v)
	if n := strings.Count(evs, "event: canceled"); n != 1 {
		t.Fatalf("%d canceled events; want 1:\n%s", n, evs)
	}
}

func (c *cluster) getFrom(t testing.TB, base, id string) jobs.View {
	t.Helper()
	saved := c.api
	c.api = base
	defer func() { c.api = saved }()
	return c.get(t, id)
}

// eventsFrom reads a finished job's whole event stream.
func (c *cluster) eventsFrom(t testing.TB, base string, v jobs.View) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/jobs/"+v.ID+"/events?token="+v.Token, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	for _, ev := range harness.ReadSSE(t, resp.Body, -1) {
		b.WriteString("event: " + ev.Event + "\n")
	}
	return b.String()
}
