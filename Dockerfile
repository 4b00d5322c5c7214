# Multi-stage build: a static sluice binary on a distroless base, run as a
# non-root user.
FROM golang:1.26.8 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/sluice ./cmd/sluice

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/sluice /usr/local/bin/sluice
# The example documents every field; its keys are public, so sluice refuses
# them on any address but loopback. Mount your own file at
# /etc/sluice/sluice.yaml (docker-compose.yml does).
COPY sluice.example.yaml /etc/sluice/sluice.example.yaml
USER nonroot:nonroot
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["serve", "--config", "/etc/sluice/sluice.yaml"]
