package api

import (
	"context"
	"sync"
	"time"

	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

// positionEvery is how often an api process checks the positions of the
// waiting jobs its clients follow. A job's `queued` event is logged at most
// once a second, whichever process sees the change first.
const positionEvery = time.Second

// watchers are the waiting jobs this process's event streams follow.
type watchers struct {
	mu   sync.Mutex
	jobs map[string]*watched
}

type watched struct {
	w    scheduler.Watched
	refs int
}

// watch adds a waiting job to the position checks until the returned func
// is called.
func (s *Server) watch(j *jobs.Job) (unwatch func()) {
	g, ok := s.group(j.Group)
	if !ok || j.FQMember == "" {
		return func() {}
	}
	s.watching.mu.Lock()
	e, ok := s.watching.jobs[j.ID]
	if !ok {
		e = &watched{w: scheduler.Watched{ID: j.ID, Member: j.FQMember, Group: g}}
		s.watching.jobs[j.ID] = e
	}
	e.refs++
	s.watching.mu.Unlock()
	return func() {
		s.watching.mu.Lock()
		defer s.watching.mu.Unlock()
		if e.refs--; e.refs <= 0 && s.watching.jobs[j.ID] == e {
			delete(s.watching.jobs, j.ID)
		}
	}
}

// pushPositions runs until the server stops: each tick, one pipelined round
// trip checks every followed waiting job and logs a `queued` event for those
// whose position moved; followers everywhere get it through the event log.
func (s *Server) pushPositions() {
	t := time.NewTicker(positionEvery)
	defer t.Stop()
	for {
		select {
		case <-s.stop.Done():
			return
		case <-t.C:
		}
		s.watching.mu.Lock()
		ws := make([]scheduler.Watched, 0, len(s.watching.jobs))
		for _, e := range s.watching.jobs {
			ws = append(ws, e.w)
		}
		s.watching.mu.Unlock()
		if len(ws) == 0 {
			continue
		}
		ctx, cancel := context.WithTimeout(s.stop, positionEvery)
		gone, err := s.d.Scheduler.PushPositions(ctx, ws)
		cancel()
		if err != nil {
			if s.stop.Err() == nil {
				s.log.Warn("could not push positions", "err", err)
			}
			continue
		}
		if len(gone) > 0 {
			s.watching.mu.Lock()
			for _, id := range gone {
				delete(s.watching.jobs, id) // left the queue: nothing more to push
			}
			s.watching.mu.Unlock()
		}
	}
}
