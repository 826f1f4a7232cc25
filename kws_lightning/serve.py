"""`python -m kws_lightning.serve ckpt_path=CKPT` (or `model_path=model.onnx`): HTTP + WebSocket service
and a live microphone page; the app, its protocol and concurrency design are in `kws_lightning.serving`."""

from __future__ import annotations

import socket

import hydra
from omegaconf import DictConfig

SERVE_HINT = "pip install 'kws-lightning[serve]'"


def serve(cfg: DictConfig) -> None:
    import torch

    try:
        import uvicorn

        from kws_lightning.serving.app import ServeSettings, build_app
    except ImportError as error:
        raise RuntimeError(f"serve needs starlette and uvicorn ({error}): {SERVE_HINT}") from None
    from kws_lightning.inference import Predictor
    from kws_lightning.stream_bench.settings import predictor_settings

    fields = ServeSettings.__dataclass_fields__
    settings = ServeSettings(**{name: cfg[name] for name in fields if cfg.get(name) is not None})
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    predictor = Predictor.from_config(
        cfg.get("ckpt_path"), cfg.get("model_path"), "cpu", trust_code=bool(cfg.get("trust_code", False))
    )
    # As listen: settings given here, else those tuned into the checkpoint (or export), else TF's defaults.
    detector, source = predictor_settings(cfg, predictor)
    print(f"detector settings ({source}): {detector.to_dict()}", flush=True)
    app = build_app(predictor, settings, detector)
    # Bound here, not by uvicorn, so port=0 works and the real port is printed for scripts and tests.
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, int(cfg.port)))
    except OSError as error:
        raise RuntimeError(
            f"cannot listen on {cfg.host}:{cfg.port} ({error.strerror}); pick port=..."
        ) from None
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app, log_level=cfg.log_level, ws_max_size=settings.max_chunk_bytes + 1024, access_log=False
    )
    print(f"serving {len(predictor.labels)} classes on http://{host}:{port}  (Ctrl-C to stop)", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    from kws_lightning.utils.cli_errors import one_line_errors

    # A bad setting, a missing extra or a busy port (each names the fix), a missing file: one line too.
    with one_line_errors(code=2, extra=(RuntimeError, FileNotFoundError, ValueError)):
        serve(cfg)


if __name__ == "__main__":
    main()
