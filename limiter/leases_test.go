package limiter_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/limiter"
)

func TestLeasesCapFleetWide(t *testing.T) {
	r := redistest.Start(t)
	ctx := context.Background()
	// Two "processes": two clients, two Leases values, one Redis.
	a := limiter.NewLeases(r.Client(t), time.Minute)
	b := limiter.NewLeases(r.Client(t), time.Minute)
	const max = 3
	var held, peak atomic.Int64
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l := a
			if i%2 == 1 {
				l = b
			}
			holder := fmt.Sprint("h", i)
			for {
				ok, _, err := l.Acquire(ctx, "g", max, holder)
				if err != nil {
					t.Error(err)
					return
				}
				if ok {
					break
				}
			}
			n := held.Add(1)
			for {
				p := peak.Load()
				if n <= p || peak.CompareAndSwap(p, n) {
					break
				}
			}
			held.Add(-1)
			if err := l.Release(ctx, "g", holder); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if p := peak.Load(); p > max {
		t.Fatalf("peak holders %d > max %d", p, max)
	}
	if n, _ := a.Held(ctx, "g"); n != 0 {
		t.Fatalf("held after all released = %d", n)
	}
}

func TestLeaseOfDeadHolderExpires(t *testing.T) {
	r := redistest.Start(t)
	ctx := context.Background()
	l := limiter.NewLeases(r.Client(t), 300*time.Millisecond)
	if ok, _, _ := l.Acquire(ctx, "g", 1, "dead"); !ok {
		t.Fatal("first acquire failed")
	}
	ok, wait, err := l.Acquire(ctx, "g", 1, "next")
	if err != nil || ok || wait <= 0 || wait > 300*time.Millisecond {
		t.Fatalf("full group: ok=%v wait=%s err=%v", ok, wait, err)
	}
	// Acquiring again as the same holder renews, not double-counts.
	if ok, _, _ := l.Acquire(ctx, "g", 1, "dead"); !ok {
		t.Fatal("holder could not re-acquire its own slot")
	}
	// Nobody renews "dead": its slot comes back within the lease time.
	deadline := time.Now().Add(5 * time.Second)
	for {
		ok, _, err := l.Acquire(ctx, "g", 1, "next")
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("dead holder's slot never came back")
		}
		time.Sleep(10 * time.Millisecond) // polling with a deadline
	}
	if ok, _ := l.Renew(ctx, "g", "dead"); ok {
		t.Fatal("an expired lease must not renew")
	}
	if ok, _ := l.Renew(ctx, "g", "next"); !ok {
		t.Fatal("a live lease must renew")
	}
}
