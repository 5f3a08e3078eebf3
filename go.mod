module github.com/kiss-onion/kiss-onion

go 1.25.0

require (
	github.com/andybalholm/brotli v1.2.1
	github.com/cretz/bine v0.2.0
	github.com/hashicorp/go-multierror v1.1.1
	github.com/klauspost/compress v1.20.4
	github.com/nix-community/go-nix v0.0.0-20250101154619-4bdde671e0a1
	github.com/pelletier/go-toml/v2 v2.4.3
	github.com/sirupsen/logrus v1.10.2
	github.com/ulikunitz/xz v0.5.17
	github.com/valyala/fasthttp v1.72.0
	golang.org/x/sys v0.46.0
)

require (
	github.com/hashicorp/errwrap v1.0.0 // indirect
	github.com/pierrec/lz4/v4 v4.1.33 // indirect
	github.com/valyala/bytebufferpool v1.0.0 // indirect
	golang.org/x/crypto v0.53.0 // indirect
	golang.org/x/net v0.56.0 // indirect
)
