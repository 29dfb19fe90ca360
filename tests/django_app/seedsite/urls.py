from django.http import JsonResponse
from django.urls import path
from notes.models import Note


def count(request):  # type: ignore[no-untyped-def]
    return JsonResponse({"notes": Note.objects.count()})


urlpatterns = [path("count/", count)]
