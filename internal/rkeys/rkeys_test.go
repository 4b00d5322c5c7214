package rkeys_test

import (
	"strings"
	"testing"

	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
)

// hashTag is the part of a key Redis Cluster hashes: between the first "{"
// and the next "}", when not empty; else the whole key.
func hashTag(key string) string {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			return key[i+1 : i+1+j]
		}
	}
	return key
}

// TestOneSlotPerGroup: every key a script of group g touches hashes like
// the group's tag — the job keys found from a job id alone included — so
// that in Redis Cluster every script stays in one slot.
func TestOneSlotPerGroup(t *testing.T) {
	for _, g := range []string{"sonnet", "haiku", "claude-opus_4"} {
		tag := rkeys.Tag(g)
		if len(tag) != rkeys.TagLen || !jobs.ValidID(jobs.NewID(g)) {
			t.Fatalf("group %s: tag %q, id %s", g, tag, jobs.NewID(g))
		}
		id := jobs.NewID(g)
		user := "al}ice{x" // braces in a user id do not move a key
		keys := []string{
			rkeys.Job(id), rkeys.JobEvents(id), rkeys.JobFollowers(id),
			rkeys.UserCounts(g, "t", user), rkeys.UserJobs(g, "t", user), rkeys.TenantJobs(g, "t"),
			rkeys.Idempotency(g, "t", user, "k}"), rkeys.NoIdempotency(g), rkeys.Usage(g, "t", "h", "2026120100"),
			rkeys.FQ(g, "order"), rkeys.WaitingUsers(g), rkeys.Limiter(g), rkeys.Reservations(g),
			rkeys.Leases(g), rkeys.HeadersSeen(g), rkeys.Live(g), rkeys.Cache(g),
			rkeys.UserPrefix(g) + "t:" + user + ":counts",
		}
		for _, k := range keys {
			if got := hashTag(k); got != tag {
				t.Errorf("group %s: key %q hashes as %q, want the group's tag %q", g, k, got, tag)
			}
		}
	}
	// A user's quota lives in the user's slot, whatever the user id holds.
	q := rkeys.Quota("t", "a}b{c")
	if hashTag(q) != rkeys.UserTag("t", "a}b{c") || rkeys.UserTag("t", "a") == rkeys.UserTag("t", "b") {
		t.Errorf("quota key %q", q)
	}
	if rkeys.Quota("t", "a:b") == rkeys.Quota("t:a", "b") {
		t.Error("two users share a quota key")
	}
}

// TestJobTag: the tag is read back from any string without a panic.
func TestJobTag(t *testing.T) {
	for _, s := range []string{"", "job_", "job_ab", "x"} {
		if rkeys.JobTag(s) != "" {
			t.Errorf("JobTag(%q) = %q", s, rkeys.JobTag(s))
		}
	}
	if got := rkeys.JobTag(jobs.NewID("g")); got != rkeys.Tag("g") {
		t.Errorf("JobTag = %q, want %q", got, rkeys.Tag("g"))
	}
}
