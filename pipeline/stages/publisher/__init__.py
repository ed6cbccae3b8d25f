"""The results publisher: results:{cam} in capture order -> alarm episodes -> ``alarms``.

``service`` is the publisher (``AlarmPublisher``); ``commands`` is ``efficientad publish``.
"""

from pipeline.stages.publisher.service import AlarmPublisher, PublisherStats

__all__ = ["AlarmPublisher", "PublisherStats"]
