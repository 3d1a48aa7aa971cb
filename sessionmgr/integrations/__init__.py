"""Guards for the sessions frameworks create themselves: ``sessionmgr.integrations.pipecat``
(extra ``sessionmgr[pipecat]``) and ``sessionmgr.integrations.livekit`` (extra
``sessionmgr[livekit]``). Each module imports its framework, so import the one you use; the
recording proxy in ``serve`` (sessionmgr/proxy.py) covers any other client."""
