package jobs_test

import (
	"context"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
)

// Followers are leases: a live process's keep counting however long they
// stay, a dead process's stop counting once their lease ends.
func TestFollowersOfADeadProcessStopCounting(t *testing.T) {
	r := redistest.Start(t)
	ctx := context.Background()
	const lease = time.Second
	alive := jobs.NewFollowers(r.Client(t), lease)
	defer alive.Close()
	dead := jobs.NewFollowers(r.Client(t), lease)

	// Three followers on a process that then dies (never leaves), one on a
	// live one that stays for many leases.
	for range 3 {
		if _, err := dead.Join(ctx, "job1"); err != nil {
			t.Fatal(err)
		}
	}
	stays, err := alive.Join(ctx, "job1")
	if err != nil {
		t.Fatal(err)
	}
	dead.Close()

	// While the dead process's leases run, a follower that leaves is not
	// the last one.
	m, err := alive.Join(ctx, "job1")
	if err != nil {
		t.Fatal(err)
	}
	if left, err := alive.Leave(ctx, "job1", m); err != nil || left != 4 {
		t.Fatalf("left after one of five leaves: %d, %v; want 4", left, err)
	}
	// Once they ran out, only the live follower counts, renewed for as
	// long as it stays.
	harness.Eventually(t, 10*time.Second, func() bool {
		m, err := alive.Join(ctx, "job1")
		if err != nil {
			t.Fatal(err)
		}
		left, err := alive.Leave(ctx, "job1", m)
		if err != nil {
			t.Fatal(err)
		}
		return left == 1
	}, "the dead process's followers to stop counting")
	start := time.Now()
	harness.Eventually(t, 10*time.Second, func() bool { return time.Since(start) > 3*lease }, "three leases to pass")
	if left, err := alive.Leave(ctx, "job1", stays); err != nil || left != 0 {
		t.Fatalf("the last follower left: %d followers remain, %v; want 0", left, err)
	}
}
