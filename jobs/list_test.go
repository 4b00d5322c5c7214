package jobs_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
)

// TestListMergesGroups: each model group keeps its own listing index (in
// its own slot); a listing merges them newest first, pages with a cursor,
// and neither skips nor repeats a job — also when one group holds far more
// jobs than a page reads from it at once, when jobs share a millisecond
// across groups, and with a status filter.
func TestListMergesGroups(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	store := jobs.NewStore(rdb, jobs.Options{})
	groups := []string{"big", "small", "empty"}
	rng := rand.New(rand.NewPCG(1, 2))
	type entry struct {
		score int64
		id    string
		done  bool
	}
	var all []entry
	base := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC).UnixMilli() * 1000
	for i := range 300 {
		g := "big"
		if rng.IntN(10) == 0 {
			g = "small"
		}
		id := jobs.NewID(g)
		// Scores as admission gives them (ms × 1000 + sequence), with runs
		// of equal scores across the groups.
		score := base + int64(i/3)*1000
		done := rng.IntN(3) == 0
		status := "queued"
		if done {
			status = "succeeded"
		}
		j := &jobs.Job{ID: id, Tenant: "t", UserID: "u", Group: g, Model: "m", CreatedAt: time.UnixMilli(score / 1000)}
		if err := rdb.HSet(ctx, rkeys.Job(id), append(store.Fields(j), "status", status)...).Err(); err != nil {
			t.Fatal(err)
		}
		if err := rdb.ZAdd(ctx, jobs.IndexKey(g, "t", "u"), redisZ(score, id)).Err(); err != nil {
			t.Fatal(err)
		}
		all = append(all, entry{score, id, done})
	}
	slices.SortFunc(all, func(a, b entry) int {
		if a.score != b.score {
			return int(b.score - a.score)
		}
		if a.id > b.id {
			return -1
		}
		return 1
	})
	for _, tc := range []struct {
		limit  int
		status jobs.Status
	}{{7, ""}, {100, ""}, {5, jobs.Succeeded}} {
		t.Run(fmt.Sprintf("limit %d status %q", tc.limit, tc.status), func(t *testing.T) {
			var want []string
			for _, e := range all {
				if tc.status == "" || e.done {
					want = append(want, e.id)
				}
			}
			var got []string
			var cur *jobs.Cursor
			for page := 0; ; page++ {
				if page > 400 {
					t.Fatal("the listing does not end")
				}
				list, next, err := store.List(ctx, jobs.ListQuery{Groups: groups, Tenant: "t", User: "u", Status: tc.status, Limit: tc.limit, After: cur})
				if err != nil {
					t.Fatal(err)
				}
				if len(list) > tc.limit {
					t.Fatalf("a page of %d, limit %d", len(list), tc.limit)
				}
				for _, j := range list {
					got = append(got, j.ID)
				}
				if next == nil {
					break
				}
				cur = next
			}
			if !slices.Equal(got, want) {
				t.Fatalf("listed %d jobs, want %d; first difference at %d", len(got), len(want), firstDiff(got, want))
			}
		})
	}
}

func firstDiff(a, b []string) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func redisZ(score int64, id string) redis.Z { return redis.Z{Score: float64(score), Member: id} }
