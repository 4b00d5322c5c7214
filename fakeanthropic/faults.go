package fakeanthropic

import (
	"fmt"
	"math"
	"net/http"
	"time"
)

// QueueFaults makes the next len(rules) /v1/messages requests, in the order
// they reach the rate limiter, get these faults, one each, before the random
// rules of Config.Faults apply again. Rate is ignored. Requests refused
// earlier (401, 400, unknown model) do not take a queued fault, and a queued
// stream fault whose request is then refused by a full bucket goes back to
// the front of the queue.
//
// An unknown Kind panics: it is a programming error. POST /_fake/faults
// checks kinds and answers 400 instead.
func (s *Server) QueueFaults(rules ...FaultRule) {
	for _, r := range rules {
		if err := r.validate(); err != nil {
			panic("fakeanthropic: QueueFaults: " + err.Error())
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.queue = append(s.queue, rules...)
}

// SetFaults replaces Config.Faults, the random fault rules, while the
// server runs: a storm of 529s is SetFaults(FaultRule{Kind:
// FaultOverloaded, Rate: 1}), and SetFaults() ends it. Rates add up to at
// most 1; an unknown Kind is an error.
func (s *Server) SetFaults(rules ...FaultRule) error {
	total := 0.0
	for _, r := range rules {
		if err := r.validate(); err != nil {
			return err
		}
		total += r.Rate
	}
	if total > 1+1e-9 {
		return fmt.Errorf("fakeanthropic: fault rates add up to %g, more than 1", total)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cfg.Faults = append([]FaultRule(nil), rules...)
	return nil
}

// drawFault returns the fault of the next request: the head of the queue,
// else a random rule, else none (Kind ""). queued says which.
func (s *Server) drawFault() (rule FaultRule, queued bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.queue) > 0 {
		rule = s.queue[0]
		s.queue = s.queue[1:]
		return rule, true
	}
	if len(s.cfg.Faults) == 0 {
		return FaultRule{}, false
	}
	// One draw for all rules, so that each rule's Rate is its exact share.
	u, acc := s.rng.Float64(), 0.0
	for _, r := range s.cfg.Faults {
		acc += r.Rate
		if u < acc {
			return r, false
		}
	}
	return FaultRule{}, false
}

// requeue puts a queued fault back at the front of the queue.
func (s *Server) requeue(rule FaultRule) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.queue = append([]FaultRule{rule}, s.queue...)
}

// faultError is the error answer of a fault that is an error status. The
// stream faults answer 200 and are handled by the reply; drop has no answer.
func faultError(rule FaultRule, now time.Time) *apiError {
	wait := rule.RetryAfter
	if wait == 0 {
		wait = DefaultRetryAfter
	}
	retryAfter := retryAfterSeconds(wait.Seconds())
	switch rule.Kind {
	case FaultOverloaded, FaultStreamError:
		return overloaded()
	case FaultAPIError:
		return &apiError{status: http.StatusInternalServerError, typ: typeAPIError,
			message: "Internal server error", shouldRetry: "true"}
	case FaultUnavailable:
		return &apiError{status: http.StatusServiceUnavailable, typ: typeAPIError,
			message: "Service temporarily unavailable", retryAfter: retryAfter, shouldRetry: "true"}
	case FaultRateLimit:
		return &apiError{status: http.StatusTooManyRequests, typ: typeRateLimit,
			message:    "This request would exceed your organization's rate limit. Please try again later.",
			retryAfter: retryAfter, shouldRetry: "true"}
	case FaultSpendLimit:
		now = now.UTC()
		nextMonth := time.Date(now.Year(), now.Month()+1, 1, 0, 0, 0, 0, time.UTC)
		return &apiError{status: http.StatusTooManyRequests, typ: typeRateLimit, code: codeSpendLimit,
			message: fmt.Sprintf("You have reached your API usage limit for this month. You will regain access on %s at 00:00 UTC.",
				nextMonth.Format(time.DateOnly)),
			shouldRetry: "false"}
	case FaultRampLimit:
		return &apiError{status: http.StatusTooManyRequests, typ: typeRateLimit, code: codeRampLimit,
			message:    "Your organization's usage is growing faster than its rate limits allow. Please ramp up traffic gradually and try again later.",
			retryAfter: retryAfter, shouldRetry: "true"}
	case FaultBadRequest:
		return invalidRequest("The request could not be processed. Please check its parameters and try again.")
	case FaultTimeout:
		return &apiError{status: http.StatusGatewayTimeout, typ: typeTimeout,
			message: "Request timed out", shouldRetry: "true"}
	}
	panic(fmt.Sprintf("fakeanthropic: fault %q has no error answer", rule.Kind))
}

func overloaded() *apiError {
	return &apiError{status: 529, typ: typeOverloaded, message: "Overloaded", shouldRetry: "true"}
}

// cutPoint is how many of n tokens a stream fault lets through: half,
// rounded up.
func cutPoint(n int) int { return int(math.Ceil(float64(n) / 2)) }

// dropConnection closes the client's connection without an answer. Servers
// that cannot hijack (HTTP/2) abort the stream instead.
func dropConnection(w http.ResponseWriter) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(http.ErrAbortHandler)
	}
	_ = conn.Close()
}
